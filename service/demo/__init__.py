"""``layertrack demo``: the paper's training dynamics, reproduced on this machine.

1. Pretrain a small Llama-shaped model from scratch on the docstrings of Python's standard
   library (present wherever Python is: nothing is downloaded), with the Trainer callback
   posting checkpoints at log-spaced steps.
2. Fine-tune the last checkpoint on a narrow task (two-digit additions written out in
   words and digits, generated here), as a separate run whose parent is the pretraining run.
3. Score the last checkpoint of each phase again with linear replaceability.
4. Print the trend table and the per-block replaceability with Spearman's rank correlations,
   write the figures and ``summary.json``.

Modules: ``corpus`` (the data and the tokenizer), ``training`` (plan, model, Trainer),
``report`` (tables, figures, summary), ``run`` (the service and the whole sequence). The
service is the one named by --url / LAYERTRACK_URL, a running ``layertrack up``, or an
embedded one (layertrack.service.embedded); it must be able to read the output folder,
which the demo checks before it trains (``run.check_service_reads``).

Importing this package imports no torch; running the demo does.
"""

from .corpus import train_tokenizer
from .run import DemoError, missing_requirement, run_demo

__all__ = ["DemoError", "missing_requirement", "run_demo", "train_tokenizer"]
