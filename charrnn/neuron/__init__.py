"""The sentiment neuron: find a unit that reads sentiment, fix it to steer text, bind one in training.

- `find`: labeled examples, L1 logistic regression on final states, `find_sentiment_unit` (`neuron find`).
- `states`: a model's states over text (final states, one unit's trace).
- `steer`: the checkpoint's unit record, `check_unit`, and the hooks that fix a unit (`sample --sentiment`).
- `bind`: `BoundObjective`, the training objective of `train --sentiment-unit`.
- `score`: each text of a file scored by the unit, P(positive) from the record's logistic fit (`neuron score`).
"""

from charrnn.neuron.bind import BOUND_UNIT, BoundObjective, char_labels, reading_scale, text_spans
from charrnn.neuron.find import FindResult, find_sentiment_unit, find_unit, load_examples
from charrnn.neuron.states import final_states, run_to_ends, unit_at_ends, unit_trace
from charrnn.neuron.steer import (check_unit, default_state, get_record, hook_for, set_record, state_names,
                                  steering_hook, upgrade_record)

__all__ = [
    "BOUND_UNIT", "BoundObjective", "FindResult", "char_labels", "check_unit", "default_state", "final_states",
    "find_sentiment_unit", "find_unit", "get_record", "hook_for", "load_examples", "reading_scale", "run_to_ends",
    "set_record", "state_names", "steering_hook", "text_spans", "unit_at_ends", "unit_trace", "upgrade_record",
]
