"""The adapter registry: each customer a registered model, each trained adapter a version.

Names: `acme` (its production alias), `acme@candidate` (any alias), `acme/3` (a version).
Versions carry lineage tags (base fingerprint, dataset hash, spec hash, file checksums) and are
fetched into a local cache keyed by version, checksums verified. Only safetensors and JSON move.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lorafleet import __version__, settings, tracking
from lorafleet.errors import BaseMismatchError, ChecksumError, RegistryError
from lorafleet.limits import NAME_RULE
from lorafleet.spec import JobSpec, RegistrySpec

T = "lorafleet."
CANDIDATE, PRODUCTION = "candidate", "production"
ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# the name part is a registered model name (prefix + customer), so it follows limits.NAME_RULE
REF = re.compile(rf"(?P<customer>{NAME_RULE})(?:@(?P<alias>[a-z0-9_-]+)|/(?P<version>[0-9]+))?")
ALIAS_OR_VERSION = re.compile(rf"{NAME_RULE}(@(?P<alias>.*)|/(?P<version>.*))")


@dataclass(frozen=True)
class AdapterRef:
    model: str  # registered model name (prefix + customer)
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        return self.model + (
            f"@{self.alias}" if self.alias else f"/{self.version}" if self.version is not None else ""
        )


def parse_ref(name: str, prefix: str = "") -> AdapterRef:
    """`acme` (its production alias), `acme@candidate`, `acme/3`. Version 0 and a capitalised
    alias are refused with their own reason: `acme/0` once read as plain `acme` (version 0 is
    falsy) and was served the production version."""
    m = REF.fullmatch(name)
    if not m:
        raise RegistryError(f"'{name}' is not an adapter name; {_ref_hint(name)}")
    version = int(m["version"]) if m["version"] is not None else None
    if version == 0:
        raise RegistryError(f"'{name}': versions start at 1; use 'acme/1' or later, or 'acme' for production")
    alias = m["alias"] or (None if version is not None else PRODUCTION)
    return AdapterRef(prefix + m["customer"], alias, version)


def _ref_hint(name: str) -> str:
    """What is wrong with a name REF refused, where the part after '@' or '/' is the culprit."""
    m = ALIAS_OR_VERSION.fullmatch(name)
    if m and m["alias"] is not None and re.fullmatch("[A-Za-z0-9_-]+", m["alias"]):
        return f"aliases are lower case: '@{m['alias'].lower()}'"
    if m and m["version"] is not None:
        return "a version is a whole number written in ASCII digits: 'acme/3'"
    return "use 'acme', 'acme@candidate' or 'acme/3'"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- registering -------------------------------------------------------------------------


def _ensure_model(c: MlflowClient, name: str, customer: str) -> None:
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(
            name,
            tags={T + "kind": "adapter", T + "customer": customer},
            description=f"LoRA adapters of customer '{customer}', one version per training run.",
        )


def version_tags(job: JobSpec, run: Any, adapter_dir: Path) -> dict[str, str]:
    t = run.data.tags
    tags = {
        "base_model": job.base_model,
        "base_fingerprint": t[T + "base_fingerprint"],
        "dataset_sha256": t[T + "dataset_sha256"],
        "spec_hash": t[T + "spec_hash"],
        "fleet": job.fleet,
        "lorafleet_version": __version__,
        "lora.rank": str(job.lora.rank),
        "lora.alpha": str(job.lora.alpha),
        "lora.target_modules": str(job.lora.target_modules),
        "lora.use_dora": str(job.lora.use_dora),
        "lora.use_rslora": str(job.lora.use_rslora),
    }
    for key in ("eval_loss", "base_eval_loss"):
        if key in run.data.metrics:
            tags[key] = repr(run.data.metrics[key])
    if T + "beats_base" in t:
        tags[T + "beats_base"] = t[T + "beats_base"]
    for name in ALLOWED_FILES:
        tags[f"sha256.{name}"] = _sha256(adapter_dir / name)
    return tags


def register_job(
    c: MlflowClient, job: JobSpec, run_id: str, adapter_dir: Path, spec: RegistrySpec
) -> ModelVersion:
    """A new version from a succeeded job run; its source is the run's adapter artefacts."""
    name = spec.model_prefix + job.customer
    tracking.mark_beats_base(c, run_id)
    run = c.get_run(run_id)
    tags = version_tags(job, run, adapter_dir)
    _ensure_model(c, name, job.customer)
    description = (
        f"Adapter for '{job.customer}' from fleet '{job.fleet}', LoRA r={job.lora.rank} "
        f"on {job.base_model} ({tags['base_fingerprint'][:19]}), dataset "
        f"{tags['dataset_sha256'][:12]}, eval loss {tags.get('eval_loss', 'n/a')} "
        f"(base {tags.get('base_eval_loss', 'n/a')})."
    )
    mv = c.create_model_version(
        name, f"{run.info.artifact_uri}/adapter", run_id=run_id, tags=tags, description=description
    )
    mv = _wait_ready(c, name, mv.version)
    c.set_registered_model_alias(name, CANDIDATE, mv.version)
    c.set_tag(run_id, T + "registered_version", f"{name}/{mv.version}")
    if spec.auto_promote != "never":
        promote(c, name, int(mv.version), if_better=spec.auto_promote == "if-better")
    return c.get_model_version(name, mv.version)  # with its aliases


def _wait_ready(c: MlflowClient, name: str, version: str, timeout_s: float = 30) -> ModelVersion:
    deadline = time.time() + timeout_s
    while True:
        mv = c.get_model_version(name, version)
        if mv.status == "READY" or time.time() > deadline:
            return mv
        time.sleep(0.2)


# ---- resolving ---------------------------------------------------------------------------


def _get_model(c: MlflowClient, name: str) -> Any:
    try:
        return c.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the store failed: not an answer about the name
        known = ", ".join(sorted(m.name for m in adapter_models(c))) or "none yet"
        raise RegistryError(f"unknown adapter '{name}'; registered adapters: {known}") from None


def resolve_version(c: MlflowClient, ref: AdapterRef, model: Any = None) -> ModelVersion:
    """The model version a name points at, or an error saying which names exist (`model`: the
    registered model, when the caller has it already)."""
    model = model or _get_model(c, ref.model)
    if ref.version is not None:
        try:
            return c.get_model_version(ref.model, str(ref.version))
        except MlflowException:
            versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{ref.model}'"))
            raise RegistryError(
                f"'{ref.model}' has no version {ref.version}; versions: {', '.join(map(str, versions))}"
            ) from None
    aliases = dict(model.aliases or {})
    if ref.alias not in aliases:
        known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
        hint = " (promote a version with `lorafleet adapters promote`)" if ref.alias == PRODUCTION else ""
        raise RegistryError(f"'{ref.model}' has no alias '{ref.alias}'{hint}; aliases: {known}")
    return c.get_model_version(ref.model, str(aliases[ref.alias]))


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str  # canonical '<model>/<version>'
    path: Path
    version: ModelVersion

    @property
    def base_fingerprint(self) -> str:
        return self.version.tags["base_fingerprint"]


def fetch(c: MlflowClient, name: str, prefix: str = "", cache: Path | None = None) -> ResolvedAdapter:
    """Resolve a name and return its local folder, downloading once per version."""
    mv = resolve_version(c, parse_ref(name, prefix))
    # keyed by content too: another store (or a re-created one) reuses names and versions
    digest = hashlib.sha256("".join(mv.tags.get(f"sha256.{f}", "?") for f in ALLOWED_FILES).encode())
    digest = digest.hexdigest()[:16]
    folder = (cache or settings.cache_dir() / "adapters") / mv.name / f"{mv.version}-{digest}"
    if not folder.is_dir():
        _download(mv, folder)
    return ResolvedAdapter(f"{mv.name}/{mv.version}", folder, mv)


def _download(mv: ModelVersion, dest: Path) -> None:
    import mlflow.artifacts

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".download-"))
    try:
        for file in ALLOWED_FILES:  # fetched one by one: nothing else (no pickles) comes down
            mlflow.artifacts.download_artifacts(
                f"{mv.source}/{file}", dst_path=str(tmp), tracking_uri=settings.tracking_uri()
            )
            verify_checksum(mv, tmp / file)
        tmp.rename(dest)  # atomic: a cached folder is always complete and verified
    except OSError:
        if not dest.is_dir():  # lost a race with another process: theirs is as good
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_checksum(mv: ModelVersion, path: Path) -> None:
    expected = mv.tags.get(f"sha256.{path.name}")
    actual = _sha256(path)
    if expected != actual:
        raise ChecksumError(
            f"{mv.name}/{mv.version}: {path.name} has sha256 {actual[:16]}..., "
            f"registered as {str(expected)[:16]}...; refusing to load it"
        )


def check_base(adapter: ResolvedAdapter, base_fingerprint: str, base_name: str = "this base") -> None:
    """Refuse an adapter trained on another base: it would load silently and produce garbage."""
    if adapter.base_fingerprint != base_fingerprint:
        trained_on = adapter.version.tags.get("base_model", "?")
        raise BaseMismatchError(
            f"adapter {adapter.name} was trained on base '{trained_on}' ({adapter.base_fingerprint}) "
            f"but is asked to run on '{base_name}' ({base_fingerprint})"
        )


# ---- promotion ---------------------------------------------------------------------------


def promote(c: MlflowClient, model: str, version: int | None = None, if_better: bool = False) -> dict:
    """Move 'production' to `version` (default: the candidate); with if_better, only when it beats
    the base model (tracking.beats_base) and production's eval loss. Rollback is promoting an
    older version."""
    target = resolve_version(
        c, AdapterRef(model, version=version) if version is not None else AdapterRef(model, alias=CANDIDATE)
    )
    current = _production(c, model)
    refusal = _refusal(target, current) if if_better else None
    if refusal:
        return {"promoted": False, "model": model, "version": int(target.version), "reason": refusal}
    c.set_registered_model_alias(model, PRODUCTION, target.version)
    return {
        "promoted": True,
        "model": model,
        "version": int(target.version),
        "previous": int(current.version) if current else None,
    }


def _refusal(target: ModelVersion, current: ModelVersion | None) -> str | None:
    """Why `target` is not better, or None: it must beat the base, then production."""
    if beats_base(target) is False:
        margin = f"{tracking.BEATS_BASE_MARGIN:.0%}"
        return (
            f"v{target.version} does not beat the base model: eval loss {target.tags.get('eval_loss')} "
            f"against the base's {target.tags.get('base_eval_loss')} on the same eval split "
            f"(an adapter must be at least {margin} lower)"
        )
    if current is not None and not _better(target, current):
        return (
            f"eval loss {target.tags.get('eval_loss')} does not beat production "
            f"v{current.version}'s {current.tags.get('eval_loss')}"
        )
    return None


def beats_base(mv: ModelVersion) -> bool | None:
    """A version's verdict against its base (tag written at registration), None if unmeasured."""
    tags = mv.tags
    if T + "beats_base" in tags:
        return tags[T + "beats_base"] == "true"
    return tracking.beats_base(_float(tags.get("eval_loss")), _float(tags.get("base_eval_loss")))


def _float(value: str | None) -> float | None:
    return float(value) if value is not None else None


def _production(c: MlflowClient, model: str) -> ModelVersion | None:
    aliases = dict(c.get_registered_model(model).aliases or {})
    return c.get_model_version(model, str(aliases[PRODUCTION])) if PRODUCTION in aliases else None


def _better(new: ModelVersion, old: ModelVersion) -> bool:
    new_loss, old_loss = new.tags.get("eval_loss"), old.tags.get("eval_loss")
    if new_loss is None:
        return False
    return old_loss is None or float(new_loss) < float(old_loss)


# ---- browsing ----------------------------------------------------------------------------


def adapter_models(c: MlflowClient) -> list[Any]:
    return list(c.search_registered_models(f"tags.`{T}kind` = 'adapter'"))


def versions(c: MlflowClient, model: str) -> list[ModelVersion]:
    """Every version, newest first, with aliases (search results lack them)."""
    found = c.search_model_versions(f"name='{model}'")
    return [
        c.get_model_version(model, v.version)
        for v in sorted(found, key=lambda v: int(v.version), reverse=True)
    ]


def list_rows(c: MlflowClient) -> list[dict[str, Any]]:
    rows = []
    for model in sorted(adapter_models(c), key=lambda m: m.name):
        vs = versions(c, model.name)
        aliases = dict(model.aliases or {})
        prod = next((v for v in vs if str(v.version) == str(aliases.get(PRODUCTION))), None)
        latest = vs[0] if vs else None
        rows.append(
            {
                "adapter": model.name,
                "latest": int(latest.version) if latest else None,
                "production": int(prod.version) if prod else None,
                "eval_loss": (prod or latest).tags.get("eval_loss") if vs else None,
                "beats_base": beats_base(prod or latest) if vs else None,
                "base": latest.tags.get("base_model") if latest else None,
                "age_s": int(time.time() - latest.creation_timestamp / 1000) if latest else None,
            }
        )
    return rows


def show(c: MlflowClient, name: str, prefix: str = "") -> dict[str, Any]:
    """An adapter and its versions; `acme/3` or `acme@candidate` shows that one version."""
    ref = parse_ref(name, prefix)
    model = _get_model(c, ref.model)
    only = resolve_version(c, ref, model).version if ("/" in name or "@" in name) else None
    return {
        "adapter": model.name,
        "description": model.description,
        "versions": [
            {
                "version": int(v.version),
                "aliases": list(v.aliases),
                "run_id": v.run_id,
                "source": v.source,
                "created": v.creation_timestamp,
                "description": v.description,
                "tags": dict(v.tags),
            }
            for v in versions(c, model.name)
            if only is None or str(v.version) == str(only)
        ],
    }


def pull(c: MlflowClient, name: str, out: Path, prefix: str = "") -> ResolvedAdapter:
    """Copy an adapter folder (plain peft layout) to `out`, a new or empty folder, whole or not
    at all."""
    adapter = fetch(c, name, prefix)  # first: a wrong name is the first thing to hear about
    fresh_output(out)
    with written_whole(out) as tmp:
        for file in ALLOWED_FILES:
            shutil.copy2(adapter.path / file, tmp / file)
    return adapter


def fresh_output(out: Path) -> Path:
    """`out` if a folder may be written there: it does not exist or is an empty folder. Nothing
    is overwritten or mixed with what was there."""
    if out.exists() and not out.is_dir():
        raise RegistryError(f"{out} is a file; give a folder to write the adapter into")
    if out.is_dir() and any(out.iterdir()):
        raise RegistryError(f"{out} is not empty; give a new or empty folder (nothing was overwritten)")
    return out


@contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; it becomes `out` only once complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    except OSError as exc:
        raise RegistryError(f"cannot write to {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (fresh_output): the complete folder takes its place
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
