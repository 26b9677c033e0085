"""Pull throughput against a real Orthanc: `ich pull` beside a plain dicomweb-client loop, in one run.

    sudo .venv/bin/python bench/pull.py --studies 20 --slices 40 --size 512

Writes hospital-style studies (`ichdata.testing.write_hospital_studies`), stores them in an Orthanc
started in a network namespace of its own (tests/orthanc.py: root, Orthanc and its DICOMweb plugin),
then inside that namespace fetches every study twice into fresh folders: with `ich pull` (QIDO-RS
listing, WADO-RS per series, raw bytes written atomically) and with the loop a user of dicomweb-client
would write (`search_for_studies`, then `retrieve_study` with `transfer-syntax=*` and `save_as` per
instance). Prints studies/s and instances/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

_LOOP = """
import json, sys, time
from pathlib import Path
from dicomweb_client import DICOMwebClient
import requests
url, out, user, password = sys.argv[1:5]
session = requests.Session()
session.auth = (user, password)
client = DICOMwebClient(url, session=session)
t0 = time.perf_counter()
n = 0
for study in client.search_for_studies(get_remaining=True):
    uid = study["0020000D"]["Value"][0]
    folder = Path(out) / uid
    folder.mkdir(parents=True)
    for ds in client.retrieve_study(uid, media_types=(("application/dicom", "*"),)):
        ds.save_as(folder / (ds.SOPInstanceUID + ".dcm"), enforce_file_format=True)
        n += 1
print(json.dumps({"seconds": time.perf_counter() - t0, "instances": n}))
"""

_PULL = """
import json, sys, time
from ichdata.pull import PullConfig, pull
url, out = sys.argv[1:3]
r = pull(PullConfig(url, __import__("pathlib").Path(out)))
print(json.dumps({"seconds": r.elapsed_s, "instances": r.instances, "studies": r.fetched}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1] / "tests" / "orthanc.py"
    spec = importlib.util.spec_from_file_location("ich_bench_orthanc", here)
    assert spec is not None
    assert spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = helpers
    spec.loader.exec_module(helpers)
    reason = helpers.orthanc_unavailable()
    if reason is not None:
        raise SystemExit(f"bench/pull.py: {reason}")
    from ichdata.testing import write_hospital_studies

    with tempfile.TemporaryDirectory(prefix="ich-bench-pull-") as tmp, helpers.running_orthanc() as orthanc:
        root = Path(tmp)
        studies = write_hospital_studies(
            root / "src", studies=args.studies, slices=args.slices, image_size=args.size
        )
        orthanc.upload([f for s in studies for f in s.files])
        results = {}
        for name, code, extra in (
            ("dicomweb-client loop", _LOOP, [orthanc.user, orthanc.password]),
            ("ich pull", _PULL, []),
        ):
            done = orthanc.run(
                [sys.executable, "-c", code, orthanc.url, str(root / name.replace(" ", "_")), *extra]
            )
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    n_inst = args.studies * args.slices
    print(
        f"{args.studies} studies x {args.slices} slices of {args.size}x{args.size} ({n_inst} instances), Orthanc 1.10"
    )
    for name, r in results.items():
        assert r["instances"] == n_inst, (name, r)
        print(
            f"  {name:22s} {r['seconds']:7.2f} s  {args.studies / r['seconds']:7.2f} studies/s  {n_inst / r['seconds']:8.1f} instances/s"
        )
    ratio = results["dicomweb-client loop"]["seconds"] / results["ich pull"]["seconds"]
    print(f"  ich pull / loop: {ratio:.2f}x")


if __name__ == "__main__":
    main()
