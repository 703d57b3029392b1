"""Write the offline (data-mirror) lm-eval task configs to a folder, for the ``lm_eval`` CLI.

    python -m sds_exp.evaluation.lm_eval_configs --tasks copa,rte,piqa --out /tmp/zs/tasks
    lm_eval --model hf --model_args pretrained=<saved model> --tasks copa,rte,piqa \\
            --include_path /tmp/zs/tasks --batch_size 8 --device cpu

The tasks keep their stock names, prompts and metrics; only the data files point at the mirror.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from sds_exp.evaluation.zeroshot import mirrored_tasks, write_task_configs

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", required=True, help=f"comma-separated; mirrored: {', '.join(mirrored_tasks())}")
    parser.add_argument("--out", required=True, help="folder for <task>.yaml (lm_eval --include_path)")
    parser.add_argument("--data-dir", default=os.environ.get("SDS_DATA_DIR"), help="the data mirror")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data_dir:
        parser.error("--data-dir (or $SDS_DATA_DIR) must name the data mirror")
    written = write_task_configs([t for t in args.tasks.split(",") if t], args.data_dir, args.out)
    for task, path in written.items():
        log.info("%s: %s", task, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
