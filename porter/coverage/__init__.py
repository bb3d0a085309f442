"""`porter coverage`: sweep every text decoder-only causal LM of the installed transformers.

The list is derived from the package, statically (files are read with ``ast``, nothing under
``transformers`` is imported): the model types of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` in
``models/auto/modeling_auto.py``, minus the encoder-decoder, encoder-only and multimodal ones
and the entries that are not a causal-LM class of their own. Each exclusion carries its reason
and the file that shows it.

Each remaining model type is converted in memory for both targets (``write=False``); the result
(converted, or the one-line diagnostic: file:line, blocking construct, rule) is cached under
``.porter-cache/coverage/`` keyed by the source's sha256, its configuration file's sha256, the
porter version and a fingerprint of porter's own code and rule tables (so a rule change
invalidates the cache). With ``verify=True`` every port that converts and has a tiny config is
run in the engine at TP=1 and TP=2, one at a time; a verify result is keyed by the sha256 of the
port's files and its tiny-config entry, and is carried over from the cache or from the previous
COVERAGE.json while the port is unchanged (then ``--verify`` does not run it again). Only settled
verdicts are kept: a pass, or a numerical mismatch; an engine that did not start runs again.

Usage: ``report = run_coverage(out=Path("generated"), verify=False, jobs=2)`` writes
``generated/COVERAGE.md`` and ``generated/COVERAGE.json`` and returns the JSON as a dict.

The package, one module per job, each importing only those above it in this list:

- ``common``: file names, targets and TPs, the day-zero releases (rules/coverage.yaml), package lookups
- ``discover``: which model types a transformers tree has, each kept or excluded with its evidence
- ``registry``: vLLM's own registry (native / Transformers backend / dropped), read statically
- ``cache``: porter's fingerprint, the cache keys, the on-disk cache
- ``worker``: one conversion (in a worker process), its diagnostic completed from the source
- ``verify_rows``: verifying converted rows, settled verdicts, carrying them over
- ``summary``: the JSON report: final statuses, counts, blocked groups, exclusions, day-zero sections
- ``markdown``: COVERAGE.md
- ``sweep``: ``run_coverage``, which runs them in that order
"""

from porter.coverage.cache import Cache, files_digest, porter_fingerprint, verify_key
from porter.coverage.common import (
    CACHE_DIR,
    COVERAGE_JSON,
    COVERAGE_MD,
    COVERAGE_RULES,
    day_zero_releases,
    dist_version,
    package_dir,
)
from porter.coverage.discover import Candidate, discover
from porter.coverage.markdown import render_md
from porter.coverage.registry import vllm_registry
from porter.coverage.sweep import run_coverage
from porter.coverage.verify_rows import record_verification
from porter.coverage.worker import convert_task, locate

__all__ = [
    "CACHE_DIR", "COVERAGE_JSON", "COVERAGE_MD", "COVERAGE_RULES", "Cache", "Candidate", "convert_task",
    "day_zero_releases", "discover", "dist_version", "files_digest", "locate", "package_dir",
    "porter_fingerprint", "record_verification", "render_md", "run_coverage", "verify_key", "vllm_registry",
]
