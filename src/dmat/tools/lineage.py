"""`dmat lineage ARTIFACT`: the stages, runs and files that produced an artifact, every link checked.

ARTIFACT is an exported model (models/export/classifier.onnx, classifier.pt2 or denoiser.onnx, or a copy
of one elsewhere), a checkpoint (models/classifier/best.pt or last.pt, models/diffusion/checkpoint.pt), an
evaluation (models/eval/<threat>) or a data store (data/real/<split>, data/synthetic, data/mixed).
Starting there and walking upstream only, each stage is described (MLflow run, the params that matter,
git commit, sha256 digests) and each record that ties it to the rest is checked:

- files: the sha256 an artifact records for its own files (meta.json, manifest.json), and the digests
  and run ids that downstream artifacts recorded for it, against the files on disk now (re-hashed);
- dvc.lock: the md5 DVC recorded for the stage's output and for the inputs of the stages downstream,
  computed by DVC itself; the code and params the stage ran with;
- MLflow: every recorded run exists in the tracking store, belongs to the right stage and finished.

A check is `verified`, `stale` (what is there now differs from what was recorded: it changed since) or
`missing` (absent, or never recorded). A stage is as good as its worst check. The `dvc.lock` checks of
a stage's inputs are shown on the input's stage, so a changed file marks its own stage and no other.

Exit codes: 0 every check verified; 1 something stale or missing (named on stderr) or an artifact that
is not there; 2 bad usage (an unrecognised artifact path, no DVC project).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dmat.artifacts import layout
from dmat.data.store import META_FILE

EXIT_OK, EXIT_NOT_VERIFIED, EXIT_USAGE = 0, 1, 2
VERIFIED, STALE, MISSING = "verified", "stale", "missing"
WORST_FIRST = (STALE, MISSING, VERIFIED)  # a stage shows its worst check: changed content before absence
STAGE_TITLES = {  # chain order: downstream first
    "export": "exported model", "evaluation": "evaluation", "classifier": "classifier training",
    "mixed": "mixed-data manifest", "synthetic": "generated store", "diffusion": "diffusion model",
    "real": "real data", "source": "real-data source", "external": "generated-data source",
}
HEX_DIGEST = re.compile(r"^[0-9a-f]{32,64}(\.dir)?$")
ARTIFACTS = (f"{layout.EXPORT_DIR}/{{{','.join(layout.EXPORTED_FILES)}}} (or a copy of one), "
             f"{layout.CLASSIFIER_BEST}, {layout.CLASSIFIER_LAST}, {layout.DIFFUSION_CHECKPOINT}, "
             f"{layout.EVAL_DIR}/THREAT, {layout.REAL_DIR}/SPLIT, {layout.SYNTHETIC_DIR} or {layout.MIXED_DIR}")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT", help=ARTIFACTS)
    parser.add_argument("--json", action="store_true", help="print the chain as JSON instead of text")
    parser.add_argument("--tracking-uri", metavar="URI", default=None,
                        help="MLflow store to look runs up in (default: $MLFLOW_TRACKING_URI, else the project's "
                             "mlflow.db); it is only read")
    parser.epilog = ("Every file of the chain is read and hashed (sha256), so a large generated store takes a "
                     "while. Exit 0 when every link is verified, 1 when any is stale or missing, 2 on bad usage.")


def run(args: argparse.Namespace) -> int:
    artifact = Path(args.artifact).resolve()
    root = find_project(artifact) or find_project(Path.cwd())
    if root is None:
        return _fail(f"{args.artifact}: not inside a DVC project (no dvc.yaml with .dvc/ above it or the "
                     "working directory)", EXIT_USAGE)
    start = locate(root, artifact)
    if start is None:
        return _fail(f"{args.artifact}: not an artifact DMAT traces; expected {ARTIFACTS}", EXIT_USAGE)
    from dmat.tracking import tracking_uri

    workspace = Workspace(root, args.tracking_uri or tracking_uri(root))
    try:
        chain = trace(workspace, start)
    finally:
        workspace.close()
    report = chain_report(workspace, args.artifact, chain)
    print(json.dumps(report, indent=2) if args.json else render(report))
    for problem in report["problems"]:
        print(f"dmat lineage: {problem['status']}: {problem['path']}: {problem['check']}", file=sys.stderr)
    return EXIT_OK if report["status"] == VERIFIED else EXIT_NOT_VERIFIED


# --- the chain's shape ---------------------------------------------------------------------------------


@dataclass
class Check:
    status: str
    check: str
    recorded: Any = None
    current: Any = None
    by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Record:
    """What a downstream artifact (`by`) recorded about an upstream stage's `fact`."""

    target: str
    fact: str
    value: Any
    by: str


@dataclass
class Node:
    """One stage of the chain: the artifact it wrote, what describes it, and the checks on it."""

    kind: str
    path: Path  # absolute; the file or directory that stands for the stage
    paths: list[Path] = field(default_factory=list)  # every file or directory of the stage's output
    details: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # current values that downstream records are checked against
    checks: list[Check] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)  # what this stage recorded about upstream ones
    upstream: list[str] = field(default_factory=list)  # keys of upstream stages known from the layout
    follow_dvc: bool = True  # also walk to the inputs dvc.yaml declares for the stage that wrote it

    @property
    def status(self) -> str:
        statuses = {c.status for c in self.checks}
        return next((s for s in WORST_FIRST if s in statuses), VERIFIED)

    def add(self, check: Check) -> None:
        if check not in self.checks:
            self.checks.append(check)

    def record(self, target: str, fact: str, value: Any, by: str) -> None:
        self.records.append(Record(target, fact, value, by))


def node_key(kind: str, path: Path) -> str:
    return f"{kind}:{path}"


def find_project(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir() and (candidate / "dvc.yaml").is_file():
            return candidate
    return None


def locate(root: Path, path: Path) -> str | None:
    """The key of the stage that `path` (anywhere in its output) belongs to, or None."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        relative = None
    if relative is not None:
        if relative in (layout.EXPORT_DIR, layout.EXPORT_MANIFEST):
            return node_key("export", root / layout.EXPORTED_CLASSIFIER_ONNX)
        if relative.parent == layout.EXPORT_DIR and relative.name in layout.EXPORTED_FILES:
            return node_key("export", path)
        if (threat := _child(relative, layout.EVAL_DIR)) is not None:
            return node_key("evaluation", root / layout.eval_dir(threat))
        if relative == layout.CLASSIFIER_DIR:
            return node_key("classifier", root / layout.CLASSIFIER_BEST)
        if relative in (layout.CLASSIFIER_BEST, layout.CLASSIFIER_LAST):
            return node_key("classifier", path)
        for directory, kind, key_path in ((layout.DIFFUSION_DIR, "diffusion", layout.DIFFUSION_CHECKPOINT),
                                          (layout.MIXED_DIR, "mixed", layout.MIXED_DIR),
                                          (layout.SYNTHETIC_DIR, "synthetic", layout.SYNTHETIC_DIR)):
            if relative == directory or directory in relative.parents:
                return node_key(kind, root / key_path)
        if (split := _child(relative, layout.REAL_DIR)) is not None:
            return node_key("real", root / layout.REAL_DIR / split)
    if path.suffix in (".onnx", ".pt2") and path.is_file():  # a copy of an exported model, e.g. on a server
        return node_key("export", path)
    return None


def _child(relative: Path, directory: Path) -> str | None:
    """The name of the entry of `directory` that `relative` is or lies in, else None."""
    depth = len(directory.parts)
    return relative.parts[depth] if relative.parts[:depth] == directory.parts and len(relative.parts) > depth else None


# --- where facts come from: files, dvc.lock, MLflow ---------------------------------------------------------


class Workspace:
    """The project being traced, with cached file hashes, DVC's view of dvc.lock and MLflow lookups."""

    def __init__(self, root: Path, uri: str):
        self.root, self.uri = root, uri
        self._hashes: dict[Path, str | None] = {}
        self._runs: dict[str, dict | None] = {}
        self._tracking_error: str | None = None
        self._dvc: DvcLock | None = None

    def display(self, path: Path) -> str:
        """Relative to the project, as dvc.yaml writes paths; absolute for what lies further away."""
        relative = os.path.relpath(path, self.root)
        return str(path) if relative.startswith(f"..{os.sep}..{os.sep}") else relative

    def sha256(self, path: Path) -> str | None:
        from dmat.files import sha256_file

        if path not in self._hashes:
            self._hashes[path] = sha256_file(path) if path.is_file() else None
        return self._hashes[path]

    def read_json(self, node: Node, path: Path) -> dict | None:
        """A JSON record of the stage; a check says why when it is absent or unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            node.add(Check(MISSING, f"{self.display(path)} is not on disk"))
            return None
        except (OSError, ValueError) as err:
            data = err
        if not isinstance(data, dict):
            node.add(Check(STALE, f"{self.display(path)} is unreadable ({data!r:.200})"))
            return None
        return data

    @property
    def dvc(self) -> DvcLock:
        if self._dvc is None:
            self._dvc = DvcLock(self.root)
        return self._dvc

    def run(self, run_id: str) -> tuple[dict | None, str | None]:
        """(run summary or None, why it could not be looked up)."""
        from dmat.tracking import TrackingError, describe_run

        if self._tracking_error is None and run_id not in self._runs:
            try:
                self._runs[run_id] = describe_run(run_id, self.uri)
            except TrackingError as err:
                self._tracking_error = str(err)
        return self._runs.get(run_id), self._tracking_error

    def find_run(self, stage: str, **query: Any) -> dict | None:
        """The newest run of `stage` matching the query (informational: nothing recorded its id)."""
        from dmat.tracking import TrackingError, find_runs

        if self._tracking_error is not None:
            return None
        try:
            runs = find_runs(stage, uri=self.uri, **query)
        except TrackingError as err:
            self._tracking_error = str(err)
            return None
        return runs[0] if runs else None

    def close(self) -> None:
        if self._dvc is not None:
            self._dvc.close()


class DvcLock:
    """dvc.yaml's stages with what dvc.lock recorded, read through DVC's own API: its md5 of a directory
    and its cache of file hashes (a file is re-hashed when its size, mtime or inode changed)."""

    def __init__(self, root: Path):
        self.error: str | None = None
        self.stages: list[Any] = []
        try:
            from dvc.repo import Repo

            self.repo = Repo(str(root))
            self.stages = list(self.repo.index.stages)
        except Exception as err:  # DVC raises many types for a broken dvc.yaml or dvc.lock
            self.repo = None
            self.error = f"{type(err).__name__}: {err}"

    def producer(self, paths: Iterable[Path]) -> tuple[Any, list[Any]] | None:
        """The stage whose outputs hold `paths`, and those outputs."""
        for stage in self.stages:
            outs = [out for out in stage.outs if any(_overlap(Path(out.fs_path), p) for p in paths)]
            if outs:
                return stage, outs
        return None

    @staticmethod
    def recorded(entry: Any) -> str | None:
        return entry.hash_info.value if entry.hash_info else None

    @staticmethod
    def current(entry: Any) -> str | None:
        return entry.get_hash().value if entry.exists else None

    def close(self) -> None:
        if self.repo is not None:
            self.repo.close()


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


# --- one builder per kind of stage ---------------------------------------------------------------------------


def build(ws: Workspace, key: str) -> Node:
    kind, path = key.split(":", 1)
    node = Node(kind, Path(path), [Path(path)])
    if not node.path.exists():
        node.add(Check(MISSING, f"{ws.display(node.path)} is not on disk"))
        _layout_upstream(ws, node)
        return node
    try:
        BUILDERS[kind](ws, node)
    except (AttributeError, TypeError, KeyError, ValueError) as err:  # records of another shape: edited by hand?
        node.add(Check(STALE, f"{ws.display(node.path)}: records of an unexpected shape ({type(err).__name__}: "
                              f"{err})"))
    return node


def build_export(ws: Workspace, node: Node) -> None:
    manifest_path = ws.root / layout.EXPORT_MANIFEST
    manifest = ws.read_json(node, manifest_path) or {}
    info = _onnx_metadata(node) if node.path.suffix == ".onnx" else manifest
    denoiser = "threat" not in info and "lineage" in info
    name = "denoiser.onnx" if denoiser else ("classifier.onnx" if node.path.suffix == ".onnx" else "classifier.pt2")
    digest = node.facts["sha256"] = ws.sha256(node.path)
    node.details["sha256"] = digest
    node.add(compare(f"sha256 of {node.path.name}", manifest.get("files", {}).get(name), digest,
                     f"{ws.display(manifest_path)} files.{name}"))
    check_run(ws, node, manifest.get("export_run_id"), "export", f"{ws.display(manifest_path)} export_run_id")
    if denoiser:
        node.follow_dvc = False  # `export` also reads the classifier's inputs; the denoiser comes from diffusion only
        _export_denoiser(ws, node, info)
    else:
        _export_classifier(ws, node, info)


def _onnx_metadata(node: Node) -> dict:
    """The model's `dmat.*` metadata_props, each a JSON string."""
    import onnx

    from dmat.onnx_contract import decode_metadata

    try:
        proto = onnx.load(str(node.path), load_external_data=False)
        return decode_metadata((e.key, e.value) for e in proto.metadata_props)
    except Exception as err:  # onnx raises protobuf's DecodeError and others for a damaged file
        node.add(Check(STALE, f"{node.path.name}: unreadable ONNX metadata ({type(err).__name__}: {err})"))
        return {}


def _export_classifier(ws: Workspace, node: Node, info: dict) -> None:
    lineage, threat, metrics = info.get("lineage", {}), info.get("threat", {}), info.get("metrics", {})
    node.details.update({
        "threat": f"{threat.get('name')}: {threat.get('norm')} eps={_num(threat.get('eps'))}",
        "accuracy": f"clean {_num(metrics.get('clean_acc'))}, robust {_num(metrics.get('robust_acc'))} "
                    f"({metrics.get('attack')}, n={metrics.get('n')}, sanity "
                    f"{'passed' if metrics.get('sanity_passed') else 'FAILED'})",
        "classes": len(info.get("classes", [])), "git_commit": lineage.get("git_commit"),
    })
    where = f"{ws.display(node.path)} metadata dmat." if node.path.suffix == ".onnx" else f"{layout.EXPORT_MANIFEST} "
    by = f"{where}lineage"
    for threat_name, run_id in lineage.get("evaluate_run_ids", {}).items():
        target = node_key("evaluation", ws.root / layout.eval_dir(threat_name))
        node.record(target, "run_id", run_id, f"{by}.evaluate_run_ids.{threat_name}")
        accuracy = info.get("evaluations", {}).get(threat_name, {}).get("robust_acc")
        node.record(target, "robust_acc", accuracy, f"{where}evaluations.{threat_name}.robust_acc")
    classifier = node_key("classifier", ws.root / layout.CLASSIFIER_BEST)
    node.record(classifier, "sha256", lineage.get("checkpoint_sha256"), f"{by}.checkpoint_sha256")
    node.record(classifier, "run_id", lineage.get("train_run_id"), f"{by}.train_run_id")
    data = lineage.get("data_sha256", {})
    node.record(node_key("mixed", ws.root / layout.MIXED_DIR), "indices_sha256", data.get("mixed_indices"),
                f"{by}.data_sha256.mixed_indices")
    node.record(node_key("synthetic", ws.root / layout.SYNTHETIC_DIR), "sha256", data.get("synthetic"),
                f"{by}.data_sha256.synthetic")
    for split in ("train", "test"):
        node.record(node_key("real", ws.root / layout.REAL_DIR / split), "sha256", data.get(split),
                    f"{by}.data_sha256.{split}")
    diffusion = node_key("diffusion", ws.root / layout.DIFFUSION_CHECKPOINT)
    node.record(diffusion, "sha256", lineage.get("diffusion_checkpoint_sha256"), f"{by}.diffusion_checkpoint_sha256")
    node.record(diffusion, "run_id", lineage.get("diffusion_run_id"), f"{by}.diffusion_run_id")
    node.record(diffusion, "adversarial_mode", lineage.get("adversarial_mode"), f"{by}.adversarial_mode")


def _export_denoiser(ws: Workspace, node: Node, info: dict) -> None:
    lineage = info.get("lineage", {})
    node.details["classes"] = len(info.get("classes", []))
    by = f"{ws.display(node.path)} metadata dmat.tools.lineage"
    diffusion = node_key("diffusion", ws.root / layout.DIFFUSION_CHECKPOINT)
    node.record(diffusion, "sha256", lineage.get("checkpoint_sha256"), f"{by}.checkpoint_sha256")
    node.record(diffusion, "run_id", lineage.get("diffusion_run_id"), f"{by}.diffusion_run_id")


def build_evaluation(ws: Workspace, node: Node) -> None:
    threat = node.path.name
    metrics_file = ws.root / layout.metrics_file(f"evaluate_{threat}")
    node.paths.append(metrics_file)
    meta = ws.read_json(node, node.path / META_FILE) or {}
    for name, recorded in sorted(meta.get("sha256", {}).items()):
        node.add(compare(f"sha256 of {name}", recorded, ws.sha256(node.path / name),
                         f"{ws.display(node.path / META_FILE)}"))
    report_file = node.path / layout.EVAL_REPORT_FILE  # what export read
    report = _eval_report(ws, node, threat, report_file)
    if report is not None:
        node.facts.update(run_id=report.mlflow_run_id, robust_acc=report.robust_acc)
        node.details.update({
            "threat": f"{threat}: {report.norm} eps={_num(report.eps)}",
            "accuracy": f"clean {_num(report.clean_acc)}, robust {_num(report.robust_acc)} (n={report.n}; "
                        f"AutoAttack {report.version}: {', '.join(report.attacks)})",
            "sanity": "passed" if report.sanity_passed else "FAILED",
            "flags": ", ".join(report.flags) or "none",
        })
    by = ws.display(report_file)
    run = check_run(ws, node, report and report.mlflow_run_id, f"evaluate@{threat}", f"{by} mlflow_run_id")
    classifier = node_key("classifier", ws.root / layout.CLASSIFIER_BEST)
    node.record(classifier, "sha256", report and report.checkpoint_sha256, f"{by} checkpoint_sha256")
    node.record(classifier, "run_id", report and report.train_run_id, f"{by} train_run_id")
    test = node_key("real", ws.root / layout.REAL_TEST)
    node.record(test, "sha256", report and report.test_sha256, f"{by} test_sha256")
    _record_run_inputs(ws, node, run, {"test": test})


def _eval_report(ws: Workspace, node: Node, threat: str, path: Path):
    """The evaluation report (an EvalReport), or None with a check that says why: absent, unreadable, or of
    another shape (written by another version of DMAT, or edited)."""
    from dmat.artifacts.loaders import load_eval_report
    from dmat.errors import DataError

    if not path.is_file():
        node.add(Check(MISSING, f"{ws.display(path)} is not on disk"))
        return None
    try:
        return load_eval_report(threat, root=ws.root)
    except DataError as err:  # the message names the file: as this report shows paths
        node.add(Check(STALE, str(err).replace(str(path), ws.display(path), 1)))
        return None


def build_classifier(ws: Workspace, node: Node) -> None:
    from dmat.artifacts.records import ClassifierHeader, ImportedClassifierHeader

    state = _checkpoint(node, ClassifierHeader, ImportedClassifierHeader)
    digest = node.facts["sha256"] = ws.sha256(node.path)
    if state is None:
        return
    node.facts["run_id"] = state.mlflow_run_id
    cfg, history = state.train_config, state.history or [{}]
    best = max(history, key=lambda row: row.get("val_robust_acc", -1))
    attack = cfg.get("attack", {})
    node.details.update({
        "sha256": digest, "model": state.model_config.name,
        "recipe": f"{cfg.get('loss')} beta={cfg.get('beta')}, {state.epoch}/{cfg.get('epochs')} epochs, "
                  f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, EMA tau {cfg.get('ema_tau')}",
        "attack": f"{attack.get('norm')} eps={_num(attack.get('eps'))}, {attack.get('steps')} steps of "
                  + (_num(attack["step_size"]) if attack.get("step_size") is not None else "the size derived from eps"),
        "best_epoch": f"{best.get('epoch')}: val clean {_num(best.get('val_clean_acc'))}, "
                      f"robust {_num(best.get('val_robust_acc'))}",
    })
    run = check_run(ws, node, state.mlflow_run_id, "train", f"{node.path.name} mlflow_run_id")
    mixed = node_key("mixed", ws.root / layout.MIXED_DIR)
    targets = {"real/train": node_key("real", ws.root / layout.REAL_TRAIN),
               "real/val": node_key("real", ws.root / layout.REAL_VAL),
               "synthetic": node_key("synthetic", ws.root / layout.SYNTHETIC_DIR)}
    _record_run_inputs(ws, node, run, targets)
    if run is not None:
        node.details["synthetic_fraction"] = run["params"].get("mix.synthetic_fraction")
        node.record(mixed, "synthetic_fraction", run["params"].get("mix.synthetic_fraction"),
                    f"MLflow run {run['run_id']} param mix.synthetic_fraction")
    node.upstream += [mixed, *targets.values()]


def build_mixed(ws: Workspace, node: Node) -> None:
    manifest_file = node.path / layout.MIX_MANIFEST_FILE
    manifest = ws.read_json(node, manifest_file) or {}
    indices = node.path / manifest.get("indices_file", "synthetic_indices.npy")
    digest = node.facts["indices_sha256"] = ws.sha256(indices)
    node.facts["synthetic_fraction"] = _text(manifest.get("synthetic_fraction"))
    node.add(compare(f"sha256 of {indices.name}", manifest.get("indices_sha256"), digest,
                     f"{ws.display(manifest_file)} indices_sha256"))
    real, synthetic = manifest.get("real", {}), manifest.get("synthetic", {})
    node.details.update({
        "synthetic_fraction": manifest.get("synthetic_fraction"),
        "images": f"{real.get('images')} real, {synthetic.get('used')} of {synthetic.get('images')} generated "
                  f"(limit {manifest.get('synthetic_limit')}, seed {manifest.get('seed')})",
        "indices_sha256": digest,
    })
    by = ws.display(manifest_file)
    real_key = node_key("real", ws.root / real.get("path", str(layout.REAL_TRAIN)))
    # mix.source heldout_real mixes a real store in place of the generated one: the manifest names which
    synthetic_path = ws.root / synthetic.get("path", str(layout.SYNTHETIC_DIR))
    synthetic_key = locate(ws.root, synthetic_path) or node_key("synthetic", synthetic_path)
    node.record(real_key, "sha256", real.get("sha256"), f"{by} real.sha256")
    node.record(synthetic_key, "sha256", synthetic.get("sha256"), f"{by} synthetic.sha256")
    if synthetic.get("sha256"):
        _found_run(ws, node, "mix", params={"mix.synthetic_fraction": _text(manifest.get("synthetic_fraction"))},
                   input_digest=synthetic["sha256"])
    node.upstream += [real_key, synthetic_key]


def build_store(ws: Workspace, node: Node) -> dict:
    """What real and generated stores share: the arrays re-hashed against meta.json; returns meta's source."""
    from dmat.data.store import IMAGES_FILE, LABELS_FILE, META_FILE, StoreMeta

    meta_file = node.path / META_FILE
    meta = ws.read_json(node, meta_file) or {}
    recorded = meta.get("sha256", {})
    hashes = {name: ws.sha256(node.path / f"{name}.npy") for name in ("images", "labels")}
    for name, file in (("images", IMAGES_FILE), ("labels", LABELS_FILE)):
        node.add(compare(f"sha256 of {file}", recorded.get(name), hashes[name], f"{ws.display(meta_file)}"))
    if None not in hashes.values() and recorded:  # the store's digest as its files are now
        now = replace(StoreMeta.from_json(meta), images_sha256=hashes["images"], labels_sha256=hashes["labels"])
        node.facts["sha256"] = now.digest
    shape = meta.get("shape", [None])
    node.details.update({"images": f"{shape[0]} x {'x'.join(map(str, shape[1:]))}, {len(meta.get('classes', []))} "
                                   "classes", "sha256": node.facts.get("sha256")})
    return meta.get("source", {})


def build_synthetic(ws: Workspace, node: Node) -> None:
    source = build_store(ws, node)
    if source.get("kind") == "external":
        _external_files(ws, node, source)
        return
    diffusion = source.get("diffusion")
    node.details["sampler"] = (f"{source.get('sampler')}, {source.get('steps')} steps, seed {source.get('seed')}, "
                               f"guidance {source.get('guidance', 1.0)}, filter_keep {source.get('filter_keep')}")
    key = node_key("diffusion", ws.root / layout.DIFFUSION_CHECKPOINT)
    by = f"{ws.display(node.path / META_FILE)} source.diffusion"
    if diffusion is None:
        node.record(key, "sha256", None, f"{by} (absent: the store was generated before DMAT recorded it)")
    else:
        node.record(key, "sha256", diffusion.get("checkpoint_sha256"), f"{by}.checkpoint_sha256")
        node.record(key, "run_id", diffusion.get("mlflow_run_id"), f"{by}.mlflow_run_id")
        node.record(key, "adversarial_mode", diffusion.get("adversarial", {}).get("mode"), f"{by}.adversarial.mode")
    if node.facts.get("sha256"):
        _found_run(ws, node, "generate", input_digest=node.facts["sha256"])
    node.upstream.append(key)


def _external_files(ws: Workspace, node: Node, source: dict) -> None:
    """generate.source external: the store came from files made elsewhere, each recorded with its sha256."""
    files = source.get("files", [])
    node.details["source"] = (f"external {source.get('format')}: {len(files)} file(s), {source.get('images')} images, "
                              f"filter_keep {source.get('filter_keep')}")
    for index, file in enumerate(files):
        path = Path(file["path"])
        key = node_key("external", (path if path.is_absolute() else ws.root / path).resolve())
        by = f"{ws.display(node.path / META_FILE)} source.files[{index}].sha256"
        node.record(key, "sha256", file.get("sha256"), by)
        node.upstream.append(key)
    if node.facts.get("sha256"):
        _found_run(ws, node, "generate", input_digest=node.facts["sha256"])


def build_diffusion(ws: Workspace, node: Node) -> None:
    from dmat.artifacts.records import DiffusionHeader

    state = _checkpoint(node, DiffusionHeader)
    digest = node.facts["sha256"] = ws.sha256(node.path)
    if state is None:
        return
    adversarial, cfg = state.adversarial, state.train_config
    node.facts.update(run_id=state.mlflow_run_id, adversarial_mode=adversarial.get("mode"))
    corrupt = cfg.get("corrupt") or {}
    node.details.update({
        "sha256": digest, "model": state.model_config.name,
        "steps": f"{state.step}/{cfg.get('steps')}, batch {cfg.get('batch_size')}, lr {cfg.get('lr')}",
        "adversarial_training": f"mode {adversarial.get('mode')}, lambda {adversarial.get('lam')}, rho "
                                f"{adversarial.get('rho')}, floor {_num(adversarial.get('floor_min'))}.."
                                f"{_num(adversarial.get('floor_max'))}",
        "corrupt": f"fraction {corrupt.get('fraction')}, sigma {corrupt.get('sigma')}",
    })
    run = check_run(ws, node, state.mlflow_run_id, "train_diffusion", f"{node.path.name} mlflow_run_id")
    real = node_key("real", ws.root / layout.REAL_TRAIN)
    _record_run_inputs(ws, node, run, {"real/train": real})
    node.upstream.append(real)


def build_real(ws: Workspace, node: Node) -> None:
    source = build_store(ws, node)
    split = node.path.name
    node.details["source"] = (f"{source.get('dataset')} {source.get('kind')} split {source.get('split')}, limit "
                              f"{source.get('limit')}, seed {source.get('seed')}, val_size {source.get('val_size')}")
    if node.facts.get("sha256"):
        _found_run(ws, node, "prepare", tags={f"dmat.output.{split}.sha256": node.facts["sha256"]})
    if source.get("path"):
        path = Path(source["path"])
        key = node_key("source", (path if path.is_absolute() else ws.root / path).resolve())
        node.record(key, "sha256", source.get("sha256"), f"{ws.display(node.path / META_FILE)} source.sha256")
        node.upstream.append(key)


def build_source(ws: Workspace, node: Node) -> None:
    from dmat.data.sources import source_sha256  # a folder's digest, as prepare recorded it

    directory = node.path.is_dir()
    digest = node.facts["sha256"] = source_sha256(node.path) if directory else ws.sha256(node.path)
    node.details.update({"kind": "directory" if directory else "file", "sha256": digest})


BUILDERS: dict[str, Callable[[Workspace, Node], Any]] = {
    "export": build_export, "evaluation": build_evaluation, "classifier": build_classifier, "mixed": build_mixed,
    "synthetic": build_synthetic, "diffusion": build_diffusion, "real": build_real, "source": build_source,
    "external": build_source,
}


def _layout_upstream(ws: Workspace, node: Node) -> None:
    """Upstream stages of an artifact that is not there to say so: the declared inputs of the stage that writes
    it (dmat.pipeline)."""
    from dmat.pipeline import producer

    declared = producer(node.path.relative_to(ws.root)) if node.path.is_relative_to(ws.root) else None
    if declared is not None:
        node.upstream += [k for k in (locate(ws.root, ws.root / read.path) for read in declared.reads) if k]


def _checkpoint(node: Node, *kinds: type):
    """The checkpoint's header (one of the records `kinds`), or None with a STALE check that says why not."""
    from dmat.artifacts.loaders import checkpoint_header
    from dmat.checkpoint import load_checkpoint
    from dmat.errors import CheckpointError, DataError

    try:
        header = checkpoint_header(load_checkpoint(node.path), node.path)
        if not isinstance(header, kinds):
            raise CheckpointError(f"{node.path}: a {header.format} checkpoint, not a {node.kind} one")
    except (CheckpointError, DataError) as err:  # unreadable, or a header of another shape (RecordError)
        node.add(Check(STALE, str(err)))
        return None
    return header


def check_run(ws: Workspace, node: Node, run_id: str | None, stage: str, by: str) -> dict | None:
    """The recorded MLflow run: in the tracking store, of the right stage, finished."""
    subject = f"MLflow run of `{stage}`"
    if not run_id:
        node.add(Check(MISSING, f"{subject}: not recorded by {by}", by=by))
        return None
    node.details["mlflow_run"] = run_id
    run, error = ws.run(run_id)
    if error:
        node.add(Check(MISSING, f"{subject} {run_id}: {error}", recorded=run_id, by=by))
        return None
    if run is None:
        node.add(Check(MISSING, f"{subject} {run_id} (recorded by {by}) is not in {ws.uri}", recorded=run_id, by=by))
        return None
    ran = run["tags"].get("dmat.stage")
    node.details["mlflow_run"] = _run_text(run)
    if ran != stage:
        node.add(Check(STALE, f"{subject}: {run_id} (recorded by {by}) is a run of `{ran}`", run_id, ran, by))
    elif run["status"] != "FINISHED":
        node.add(Check(STALE, f"{subject} {run_id} ended {run['status']}", run_id, run["status"], by))
    else:
        node.add(Check(VERIFIED, f"{subject} {run_id} in the tracking store, FINISHED", run_id, run_id, by))
    return run


def _record_run_inputs(ws: Workspace, node: Node, run: dict | None, targets: dict[str, str]) -> None:
    """The sha256 of each dataset the run logged as an input, as a record about that dataset's stage."""
    for entry in (run or {}).get("inputs", []):
        if entry["name"] in targets:
            node.record(targets[entry["name"]], "sha256", entry.get("dmat.sha256"),
                        f"MLflow run {run['run_id']} input {entry['name']}")


def _found_run(ws: Workspace, node: Node, stage: str, **query: Any) -> None:
    found = ws.find_run(stage, **query)
    if found is not None:
        node.details["mlflow_run"] = f"{_run_text(found)}; found by digest"


def _run_text(run: dict) -> str:
    commit = run["tags"].get("git.commit", "")
    return f"{run['run_id']} ({run['tags'].get('dmat.stage')}, {run['status']}, git {commit[:12] or 'unknown'})"


# --- walking the chain ---------------------------------------------------------------------------------------


def trace(ws: Workspace, start: str) -> list[Node]:
    """Every stage upstream of `start` (found from the artifacts' records, the layout and dvc.lock), with each
    record and each dvc.lock entry checked; downstream first."""
    nodes: dict[str, Node] = {}
    pending = [start]
    while pending:
        key = pending.pop(0)
        if key in nodes:
            continue
        node = nodes[key] = build(ws, key)
        pending += [r.target for r in node.records] + node.upstream + _dvc_upstream(ws, node)
    for node in list(nodes.values()):
        for record in node.records:
            nodes[record.target].add(check_record(ws, record, nodes[record.target]))
    for node in nodes.values():
        check_dvc(ws, node, nodes)
    return sorted(nodes.values(), key=_chain_order)


def in_layout(ws: Workspace, node: Node) -> bool:
    """Whether a pipeline stage wrote the node's path (not a data source, nor a copy of a model)."""
    if node.kind == "export":
        return node.path.parent == ws.root / layout.EXPORT_DIR
    return node.kind not in ("source", "external")


def _dvc_upstream(ws: Workspace, node: Node) -> list[str]:
    """Upstream stages from the inputs dvc.yaml declares for the stage that wrote `node`."""
    if not (node.follow_dvc and in_layout(ws, node)) or ws.dvc.error:
        return []
    found = ws.dvc.producer(node.paths)
    if found is None:
        return []
    keys = (locate(ws.root, Path(dep.fs_path)) for dep in found[0].deps if not _is_params(dep))
    return [k for k in keys if k]


def check_record(ws: Workspace, record: Record, target: Node) -> Check:
    current = target.facts.get(record.fact)
    subject = f"{record.fact} {ws.display(target.path)}" if record.fact != "sha256" else \
        f"sha256 of {ws.display(target.path)}"
    if record.value is not None and not target.path.exists():
        return Check(MISSING, f"{subject}: recorded by {record.by}, but not on disk", record.value, None, record.by)
    return compare(subject, _text(record.value), _text(current), record.by)


def check_dvc(ws: Workspace, node: Node, nodes: dict[str, Node]) -> None:
    """dvc.lock: the stage's recorded output md5, and its recorded inputs (shown on their own stages)."""
    if not in_layout(ws, node):
        return
    lock = ws.dvc
    if lock.error:
        node.add(Check(MISSING, f"dvc.lock: cannot be read ({lock.error})"))
        return
    found = lock.producer(node.paths)
    if found is None:
        node.add(Check(MISSING, f"dvc.yaml: no stage writes {ws.display(node.path)}"))
        return
    stage, outs = found
    for out in outs:
        subject = f"dvc.lock `{stage.addressing}` output {ws.display(Path(out.fs_path))}"
        if lock.recorded(out) is None:
            node.add(Check(MISSING, f"{subject}: not recorded (the stage has not run under DVC: `dvc repro`)"))
        else:
            node.add(compare(subject, lock.recorded(out), lock.current(out), "dvc.lock"))
    if all(lock.recorded(out) is not None for out in outs):
        _check_dvc_inputs(ws, node, stage, nodes)


def _check_dvc_inputs(ws: Workspace, node: Node, stage: Any, nodes: dict[str, Node]) -> None:
    """Each data input goes on the stage that wrote it; code and params stay with this stage."""
    own_changes = []
    for dep in stage.deps:
        targets = [] if _is_params(dep) else [
            n for n in nodes.values() if n is not node and any(_overlap(Path(dep.fs_path), p) for p in n.paths)]
        if not targets:
            own_changes += [f"{name} {what}" for name, what in _flat_status(dep.workspace_status())]
            continue
        subject = f"dvc.lock `{stage.addressing}` input {ws.display(Path(dep.fs_path))}"
        for target in targets:
            target.add(compare(subject, DvcLock.recorded(dep), DvcLock.current(dep), "dvc.lock"))
    subject = f"dvc.lock `{stage.addressing}` code and params"
    if own_changes:
        node.add(Check(STALE, f"{subject} changed since it ran: {', '.join(own_changes)}", by="dvc.lock"))
    else:
        node.add(Check(VERIFIED, f"{subject} as recorded", by="dvc.lock"))


def _flat_status(status: dict) -> list[tuple[str, str]]:
    """DVC's workspace status ({path: "modified"} or {params.yaml: {key: "modified"}}) as (name, change) pairs."""
    pairs = []
    for name, what in status.items():
        if isinstance(what, dict):
            pairs += [(f"{os.path.basename(name)}:{key}", change) for key, change in what.items()]
        else:
            pairs.append((name, what))
    return pairs


def _is_params(dep: Any) -> bool:
    from dvc.dependency.param import ParamsDependency

    return isinstance(dep, ParamsDependency)


def compare(subject: str, recorded: Any, current: Any, by: str) -> Check:
    if recorded is None:
        return Check(MISSING, f"{subject}: not recorded by {by}", None, current, by)
    if current is None:
        return Check(MISSING, f"{subject}: {by} recorded {_short(recorded)}, nothing on disk now", recorded, None, by)
    if recorded == current:
        return Check(VERIFIED, f"{subject} {_short(current)} = {by}", recorded, current, by)
    return Check(STALE, f"{subject} is {_short(current)}, {by} recorded {_short(recorded)}: changed since",
                 recorded, current, by)


def _chain_order(node: Node) -> tuple:
    kinds = list(STAGE_TITLES)
    splits = layout.REAL_SPLITS
    split = splits.index(node.path.name) if node.kind == "real" and node.path.name in splits else len(splits)
    return kinds.index(node.kind), split, str(node.path)


# --- output --------------------------------------------------------------------------------------------------


def chain_report(ws: Workspace, artifact: str, chain: list[Node]) -> dict:
    problems = [{"stage": n.kind, "path": ws.display(n.path), "status": c.status, "check": c.check}
                for n in chain for c in n.checks if c.status != VERIFIED]
    counts = {s: sum(c.status == s for n in chain for c in n.checks) for s in (VERIFIED, STALE, MISSING)}
    return {
        "artifact": artifact, "project": str(ws.root), "tracking_uri": ws.uri,
        "status": next((s for s in WORST_FIRST if counts[s]), VERIFIED), "counts": counts,
        "stages": [{"stage": n.kind, "title": STAGE_TITLES[n.kind], "path": ws.display(n.path), "status": n.status,
                    "details": n.details, "checks": [c.to_json() for c in n.checks]} for n in chain],
        "problems": problems,
    }


def render(report: dict) -> str:
    lines = [f"Lineage of {report['artifact']} (project {report['project']}, MLflow {report['tracking_uri']})", ""]
    for i, stage in enumerate(report["stages"], 1):
        lines.append(f"{i}. {stage['title']}: {stage['path']}  [{stage['status']}]")
        width = max((len(k) for k in stage["details"]), default=0)
        lines += [f"     {key.ljust(width)}  {_short(value)}" for key, value in stage["details"].items()
                  if value is not None]
        lines += [f"     {check['status']:<8}  {check['check']}" for check in stage["checks"]]
        lines.append("")
    counts = report["counts"]
    lines.append(f"{len(report['stages'])} stages, {sum(counts.values())} checks: {counts[VERIFIED]} verified, "
                 f"{counts[STALE]} stale, {counts[MISSING]} missing -> {report['status'].upper()}")
    return "\n".join(lines)


def _short(value: Any) -> Any:
    """Digests shortened to 12 characters for people; JSON keeps them whole."""
    if isinstance(value, str) and HEX_DIGEST.match(value) and len(value) != 32:  # run ids (32 hex) stay whole
        return value[:12]
    return value


def _text(value: Any) -> Any:
    """Numbers compared as MLflow stores them (text); None stays None."""
    return value if value is None or isinstance(value, str) else str(value)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _fail(message: str, code: int) -> int:
    print(f"dmat lineage: error: {message}", file=sys.stderr)
    return code
