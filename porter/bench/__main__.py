"""``python -m porter.bench worker SPEC``: one bench worker (started by ``Worker``);
``python -m porter.bench MODEL [REPEATS]``: a bench run, printed as a table."""

import json
import sys

from porter.bench.run import run_bench
from porter.bench.table import render
from porter.bench.worker import serve

if len(sys.argv) >= 3 and sys.argv[1] == "worker":
    serve(json.loads(sys.argv[2]))
else:
    res = run_bench(sys.argv[1], repeats=int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    print(render(res))
