"""A process for launch.local's tests: `--behaviour=A,B,...` gives process i its part, either
`exit:CODE:SECONDS` (print a line, wait, exit with CODE) or `hang` (wait until stopped)."""

import sys
import time

args = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:] if "=" in a)
mine = args["behaviour"].split(",")[int(args.get("process_id", 0))]
if mine == "hang":
  print("waiting in a collective", flush=True)
  time.sleep(600)
_, code, seconds = mine.split(":")
time.sleep(float(seconds))
print(f"Error: process {args.get('process_id')} failed", flush=True)
sys.exit(int(code))
