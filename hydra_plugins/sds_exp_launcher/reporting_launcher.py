"""``hydra/launcher=local_parallel``: submitit's local launcher that reports every job as it ends.

The stock launcher waits for the jobs in submission order and prints nothing until all are done. This one
logs each job's end as it happens (job number, overrides, Hydra status, the job's own ``metrics.json``
status and final perplexity, wall time since the sweep started), then returns the results in order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

log = logging.getLogger(__name__)


def _record(job_return: JobReturn) -> str:
    """The job's own record in a few words: status and final perplexity from its metrics.json."""
    try:
        out_dir = Path(str(job_return.hydra_cfg.hydra.runtime.output_dir))
        state = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    except Exception:  # no record (refused before it wrote one, or not an sds_exp job)
        return "no metrics.json"
    ppl = {k: v for k, v in (state.get("metrics") or {}).items() if k.startswith("final/") and k.endswith("/ppl")}
    return f"metrics.json {state.get('status')}" + "".join(f", {k} {v:.4g}" for k, v in ppl.items())


class ReportingLocalLauncher(LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        submit = submitit.AutoExecutor.map_array
        start = time.perf_counter()

        def map_and_report(executor: Any, fn: Any, *iterables: Any) -> list:
            jobs = submit(executor, fn, *iterables)
            number = {job.job_id: initial_job_idx + i for i, job in enumerate(jobs)}
            for done, job in enumerate(submitit.helpers.as_completed(jobs), 1):
                idx = number[job.job_id]
                try:
                    ret = job.results()[0]
                    what = f"{ret.status.name}, {_record(ret)}"
                except Exception as exc:  # the job process itself died
                    what = f"CRASHED ({type(exc).__name__}: {exc})"
                log.info(
                    "job #%d ended (%d/%d, %.0f s): %s [%s]",
                    idx,
                    done,
                    len(jobs),
                    time.perf_counter() - start,
                    what,
                    " ".join(job_overrides[idx - initial_job_idx]),
                )
            return jobs

        with mock.patch.object(submitit.AutoExecutor, "map_array", map_and_report):
            return super().launch(job_overrides, initial_job_idx)
