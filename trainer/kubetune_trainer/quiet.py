"""Output a user cannot act on stays out of the trainer's log (a newcomer's first run shows none):

- bitsandbytes' notice that an optional CPU inference kernel from the hub (`kernels`) is not installed: the
  trainer turns that inference path off anyway (model.keep_trainable_4bit_layout);
- bitsandbytes' warning that its paged optimizer pages nothing on a CPU: a CPU run takes the GPU's optimizer
  on purpose (devices.optimizer_for), and the optimizer log line says what runs;
- FutureWarnings raised inside transformers and peft about their own internals (peft calls deprecated
  transformers APIs; only a library upgrade changes that);
- progress bars of transformers and huggingface_hub when the log is JSON lines (a pod, a pipe): one bar
  redrawn 272 times is noise in `kubectl logs`. At a terminal they stay.

No torch import: installed before the training stack loads, since bitsandbytes logs at import time.
"""

from __future__ import annotations

import logging
import warnings


class _DropOptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_libraries(progress_bars: bool) -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\..*)?$")
    if not progress_bars:
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as transformers_logging
        except ImportError:
            return
        transformers_logging.disable_progress_bar()
