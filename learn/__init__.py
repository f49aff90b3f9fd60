"""The learner: training recipes, EM/F1 evaluation, the gate, the adapter registry, the cycle and its schedule.

    tunewheel learn run | learn schedule | eval | adapters ... | restyle ...     (learn/cli*.py)

Data flow, one module each: curated snapshot (feedback/) -> train.py (the recipe; train_config.py
is the [learn.train] section, train_data.py its data path) -> evaluate.py + metrics.py (EM/F1) ->
gate.py -> registry.py; cycle.py runs them in order under lock.py, scheduler.py decides when.
The restyler's: restyle_synth.py (synthetic styles) -> restyle.py (chunks, pairs, the build) with
restyle_destyle.py (de-styling and its rules) -> restyle_style.py (style classifier, content
measures) -> restyle_train.py (train) -> restyle_gate.py (scored on chat answers with
restyle_request.py, the request the gateway sends too). Imports nothing from serve/.
"""
