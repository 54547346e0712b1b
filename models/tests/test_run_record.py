"""models/run_record.py against records gtr-run writes: a plain run, a shard merged, an adaptive
run, a profiled one and an unfinished one are accepted; wrong types and missing fields, each
state's own included, are named. Needs the gtr-run
binary ($GTR_RUN_BIN, else target/debug/gtr-run, built by `cargo build`).

    python3 models/tests/test_run_record.py
"""
import copy
import os
import subprocess
import sys
import tempfile

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(MODELS)
sys.path.insert(0, os.path.join(MODELS, "tests"))
sys.path.insert(0, ROOT)

from fixture_copies import check  # noqa: E402

from models.run_record import RunRecordError, read_run_record  # noqa: E402
from models.run_record import check as check_record  # noqa: E402

BIN = os.environ.get("GTR_RUN_BIN", os.path.join(ROOT, "target", "debug", "gtr-run"))
TINY = os.path.join(ROOT, "models", "fixtures", "tiny")


def gtr_run(*args):
    r = subprocess.run([BIN, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def main():
    with tempfile.TemporaryDirectory() as tmp:
        out = lambda name: os.path.join(tmp, name)  # noqa: E731
        gtr_run(TINY, "schedules/gtr-fast.gtr", "--num-images", "2", "--out", out("plain"))
        gtr_run(TINY, "schedules/gtr-adaptive.gtr", "--num-images", "1", "--out", out("adaptive"))
        gtr_run(TINY, "schedules/gtr-fast.gtr", "--num-images", "1", "--out", out("profiled"),
                "--ort-profile", out("profiles"))
        for k in ("0", "1"):
            gtr_run(TINY, "schedules/gtr-fast.gtr", "--num-images", "2", "--shard", f"{k}/2",
                    "--out", out(f"shard{k}"))
        gtr_run("merge", out("merged"), out("shard0"), out("shard1"))
        records = {name: read_run_record(out(name))
                   for name in ("plain", "adaptive", "profiled", "merged", "shard0")}
        check("reveal_orders" in records["adaptive"] and records["merged"]["parts"],
              "the adaptive and merged records have their own fields")
        # A record as a run leaves it while it writes images: unfinished, with its writer.
        unfinished = copy.deepcopy(records["plain"])
        unfinished.update(finished=False, writer={"pid": 7, "host": "h"})
        check(check_record(unfinished) is unfinished, "an unfinished record with its writer is accepted")
        for why, name, field, edit in [
            ("a missing field", "plain", "steps", lambda r: r.pop("steps")),
            ("a wrong type", "plain", "mar_steps", lambda r: r.__setitem__("mar_steps", "8")),
            ("a boolean for a number", "plain", "mar_steps", lambda r: r.__setitem__("mar_steps", True)),
            ("a list of strings for integers", "plain", "labels", lambda r: r.__setitem__("labels", ["x"])),
            ("a wrong type in an optional field", "plain", "model.sha256",
             lambda r: r["model"].__setitem__("sha256", 5)),
            ("a wrong type in a profile", "profiled", "graphs[].kernels.events",
             lambda r: r["graphs"][0]["kernels"].__setitem__("events", "many")),
            # Each state's own required fields.
            ("a merged record's part without its folder", "merged", "parts[].dir",
             lambda r: r["parts"][1].pop("dir")),
            ("an adaptive record without its scoring FLOPs", "adaptive", "cost_per_image.scoring_flops",
             lambda r: r["cost_per_image"].pop("scoring_flops")),
            ("an unfinished record without its writer", "plain", "writer",
             lambda r: r.__setitem__("finished", False)),
            ("a profile without its events", "profiled", "graphs[].kernels.events",
             lambda r: r["graphs"][0]["kernels"].pop("events")),
        ]:
            record = copy.deepcopy(records[name])
            edit(record)
            try:
                check_record(record)
                check(False, f"{why} is refused")
            except RunRecordError as e:
                check(f"`{field}`" in str(e), f"{why} is refused, naming `{field}` ({e})")
    print("all run_record tests passed")


if __name__ == "__main__":
    main()
