"""The one error type of the deploy kit: its message says what to do."""


class DeployError(Exception):
    """A deploy, provision or rollback cannot go on; the message tells the operator what to fix."""
