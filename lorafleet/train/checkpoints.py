"""A slot job's checkpoints in the storage path (a local folder or an fsspec/pyarrow URI such as
s3://...), laid out as Ray Train lays out a job's own run:
`<storage>/<fleet>-<customer>-<hash>/checkpoint_<step>/checkpoint/` holds the HF checkpoint.
The newest two are kept, as with `CheckpointConfig(num_to_keep=2)`."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from lorafleet.train.plan import JobPlan

KEEP = 2
STEP_FOLDER = re.compile(r"^checkpoint_(\d+)$")  # ours; Ray Train's own runs use timestamps
HF_FOLDER = "checkpoint"  # RayTrainReportCallback.CHECKPOINT_NAME


class JobCheckpoints:
    def __init__(self, storage: str, plan: JobPlan):
        import pyarrow.fs

        from lorafleet.train.plan import ray_run_name

        self.fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        self.root = f"{root.rstrip('/')}/{ray_run_name(plan.job, plan.job_hash)}"

    def steps(self) -> list[int]:
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        found = [STEP_FOLDER.match(i.base_name) for i in infos if i.type == pyarrow.fs.FileType.Directory]
        return sorted(int(m[1]) for m in found if m)

    def latest(self) -> str | None:
        """A local copy of the newest checkpoint's HF folder, or None if the job has none."""
        import pyarrow.fs

        steps = self.steps()
        if not steps:
            return None
        local = Path(tempfile.mkdtemp(prefix="lorafleet-resume-")) / HF_FOLDER
        local.mkdir()
        pyarrow.fs.copy_files(
            f"{self.root}/checkpoint_{steps[-1]:06d}/{HF_FOLDER}",
            str(local),
            source_filesystem=self.fs,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )
        return str(local)

    def save(self, hf_checkpoint: Path, step: int) -> None:
        import pyarrow.fs

        dest = f"{self.root}/checkpoint_{step:06d}/{HF_FOLDER}"
        self.fs.create_dir(dest, recursive=True)  # a local folder must exist first; S3 needs none
        pyarrow.fs.copy_files(
            str(hf_checkpoint),
            dest,
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )
        for old in self.steps()[:-KEEP]:
            self.fs.delete_dir(f"{self.root}/checkpoint_{old:06d}")
