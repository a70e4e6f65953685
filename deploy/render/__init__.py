"""Pure renderers of the files the kit puts on servers: a context in, the file's text out, testable without SSH."""
