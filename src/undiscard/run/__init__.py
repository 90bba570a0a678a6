"""Running a model under states.

* :mod:`~undiscard.run.inputs`: checks on the batch, dtype and mode a model is run with.
* :mod:`~undiscard.run.engine`: :func:`run_states` / :func:`use_states`, one forward with a state per sample.
* :mod:`~undiscard.run.trie`: the shared-prefix evaluator: states that share their first offsets share the
  computation up to the first site where they differ (docs/method.md, "Shared-prefix engine").
"""

from undiscard.run.engine import run_states, use_states
from undiscard.run.trie import SharedPrefixEvaluator, run_trie

__all__ = ["run_states", "use_states", "SharedPrefixEvaluator", "run_trie"]
