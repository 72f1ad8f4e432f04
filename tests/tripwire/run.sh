#!/usr/bin/env bash
# The credlock tripwire kit's tests (tests/tripwire, ami/monitoring/TRIPWIRE.md): the EventBridge
# pattern in moto's EventBridge, the CloudFormation template through cfn-lint, the Athena query
# in DuckDB and sqlglot's Trino parser, the Logs Insights query through an offline checker.
# Uses .venv (tests/setup.sh creates it) and installs tests/tripwire/requirements.txt into it
# when a package there is missing or at another version. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

py=.venv/bin/python
req=tests/tripwire/requirements.txt
if [[ ! -x "$py" ]]; then
  echo "tripwire: no .venv in $PWD; run tests/setup.sh first" >&2
  exit 1
fi

if ! "$py" - "$req" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement

missing = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            missing.append(line)
    except PackageNotFoundError:
        missing.append(line)
if missing:
    print("tripwire: missing or other version: " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
PY
then
  echo "tripwire: .venv/bin/pip install -q -r $req"
  .venv/bin/pip install -q -r "$req"
fi

exec "$py" -m pytest -q -p no:cacheprovider tests/tripwire "$@"
