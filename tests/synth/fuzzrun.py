"""A fuzzing campaign: build the seeds, learn their anatomy, generate inputs from one random
seed, hand them to workers with a deadline each, and count outcomes and findings.

Deterministic for a given ``--seed`` and seed set: input *i* is the same on every run, so a
finding's JSON (seed name + patches) reproduces it, and ``--replay FILE`` runs one again.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.synth.fuzz import Worker, materialize
from tests.synth.fuzzbase import SEEDS, Anatomy, anatomy, build_seed
from tests.synth.mutate import Input, mutate

__all__ = ["Campaign", "prepare_seeds", "run_campaign"]


@dataclass
class Campaign:
    """The running totals of a campaign."""

    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    findings: list[dict[str, Any]] = field(default_factory=list)
    signatures: Counter[str] = field(default_factory=Counter)
    hangs: int = 0
    crashes: int = 0
    started: float = field(default_factory=time.monotonic)
    slowest: float = 0.0
    slowest_input: dict[str, Any] = field(default_factory=dict)

    def rate(self) -> float:
        return self.inputs / max(1e-9, time.monotonic() - self.started)

    def summary(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "seconds": round(time.monotonic() - self.started, 1),
                "inputs_per_s": round(self.rate(), 1), "hangs": self.hangs,
                "crashes": self.crashes, "findings": len(self.findings),
                "finding_kinds": dict(self.signatures), "outcomes": dict(self.outcomes),
                "slowest_input_s": round(self.slowest, 3), "slowest_input": self.slowest_input,
                "mutations": dict(self.mutations.most_common())}


def prepare_seeds(workdir: Path, names: list[str], real: Path | None) -> dict[str, Anatomy]:
    """Write each seed, an image copy of it for the backend, and seeds.json for the workers."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    anat: dict[str, Anatomy] = {}
    for name in names:
        path = build_seed(name, workdir / f"{name}.vmcore")
        paths[name] = str(path)
        anat[name] = anatomy(path)
    if real is not None:
        paths["real"] = str(real)
        anat["real"] = anatomy(real, real=True)
    for path in paths.values():
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", path, path + ".image"],
                       check=True)
    (workdir / "seeds.json").write_text(json.dumps(paths))
    return anat


def _reader(path: str) -> Any:
    fh = open(path, "rb")  # noqa: SIM115 - lives as long as the campaign

    def read(off: int, n: int) -> bytes:
        fh.seek(off)
        return fh.read(n).ljust(n, b"\0")
    return read


def _signature(kind: str, detail: dict[str, Any]) -> str:
    text = str(detail.get("finding", detail))
    tb = detail.get("traceback", "")
    where = ""
    for line in tb.splitlines():
        if line.strip().startswith("File "):
            where = line.strip()
    return f"{kind}: {text.split(':')[0]} {where}".strip()


def run_campaign(count: int, seed: int, workdir: Path, *, jobs: int = 1, timeout: float = 10.0,
                 real: Path | None = None, names: list[str] | None = None,
                 findings_dir: Path | None = None, progress: Path | None = None,
                 prepare_every: int = 50, verbose: bool = False) -> Campaign:
    names = names or list(SEEDS)
    anat = prepare_seeds(workdir, names, real)
    seeds = json.loads((workdir / "seeds.json").read_text())
    readers = {name: _reader(seeds[name]) for name in anat}
    order = sorted(anat)
    rng = random.Random(seed)
    camp = Campaign()
    workers = [Worker(workdir) for _ in range(max(1, jobs))]
    last_progress = 0.0
    try:
        # One worker per job, inputs handed round-robin; jobs > 1 run in threads.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(workers)) as pool:
            batch: list[tuple[int, Input]] = []
            for i in range(count):
                # A real core is 10-50 times slower to plan: 2% of inputs.
                synth = [n for n in order if n != "real"]
                name = "real" if "real" in anat and rng.random() < 0.02 else synth[i % len(synth)]
                inp = mutate(rng, name, anat[name], readers[name])
                inp.prepare = prepare_every > 0 and i % prepare_every == 0 and name != "real"
                batch.append((i, inp))
                if len(batch) < len(workers) and i + 1 < count:
                    continue
                pairs = zip(workers, batch, strict=False)
                results = pool.map(lambda wi: wi[0].run(wi[1][1], timeout), pairs)
                for (idx, one), res in zip(batch, results, strict=False):
                    _record(camp, idx, one, res, findings_dir, seeds, verbose)
                batch = []
                now = time.monotonic()
                if progress is not None and now - last_progress > 5:
                    last_progress = now
                    progress.write_text(json.dumps(camp.summary(), indent=1) + "\n")
    finally:
        for w in workers:
            w.stop()
        if progress is not None:
            progress.write_text(json.dumps(camp.summary(), indent=1) + "\n")
    return camp


def _record(camp: Campaign, idx: int, inp: Input, res: dict[str, Any] | None,
            findings_dir: Path | None, seeds: dict[str, str], verbose: bool) -> None:
    camp.inputs += 1
    for what in inp.what:
        word = what.split(" ")[0].split("[")[0]
        camp.mutations[" ".join(what.split(" ")[:2]) if word == "struct" else word] += 1
    found: list[tuple[str, dict[str, Any]]] = []
    if res is None:
        camp.hangs += 1
        found.append(("hang", {"finding": "input outlived its deadline"}))
    elif "died" in res:
        camp.crashes += 1
        found.append(("crash", {"finding": f"worker died with status {res['died']}"}))
    else:
        took = float(res.pop("seconds", 0.0))
        if took > camp.slowest:
            camp.slowest, camp.slowest_input = took, {"index": idx, **inp.to_json()}
        for path, r in res.items():
            if "finding" in r:
                found.append((path, r))
            else:
                camp.outcomes[f"{path}:{r.get('outcome')}/{r.get('rc', 0)}"] += 1
    for kind, detail in found:
        sig = _signature(kind, detail)
        camp.signatures[sig] += 1
        doc = {"index": idx, "kind": kind, "signature": sig, "detail": detail,
               "input": inp.to_json()}
        if inp.seed == "real":
            doc["real"] = seeds["real"]
        camp.findings.append(doc)
        if verbose:
            print(f"finding #{idx} {sig}", file=sys.stderr)
        if findings_dir is not None and camp.signatures[sig] <= 3:
            findings_dir.mkdir(parents=True, exist_ok=True)
            n = len(list(findings_dir.glob("*.json")))
            (findings_dir / f"finding-{n:03d}.json").write_text(json.dumps(doc, indent=1))
            if inp.seed != "real":
                materialize(Path(seeds[inp.seed]), inp, findings_dir / f"finding-{n:03d}.vmcore")


def replay(doc: dict[str, Any], workdir: Path, timeout: float = 60.0) -> dict[str, Any] | None:
    """Run one finding's input again (its seed rebuilt, or the real core it named)."""
    inp = Input.from_json(doc.get("input", doc))
    real = Path(doc["real"]) if inp.seed == "real" and "real" in doc else None
    prepare_seeds(workdir, [inp.seed] if inp.seed in SEEDS else [], real)
    w = Worker(workdir)
    try:
        return w.run(inp, timeout)
    finally:
        w.stop()
