"""Plan a fit before renting GPUs: parameters, memory per GPU, FLOPs and time of the fit that ``fit --config ...``
would run, for 7B and 13B models at full shape on a machine without a GPU (``rega plan``).

The model is built on the ``meta`` device from its ``config.json`` alone (shipped in ``model_configs/`` for the
models the configs name), the fit's LoRA is applied to it, and everything else is arithmetic over the counts:

* :mod:`rega.plan.sources`: where a model's ``config.json`` comes from (never downloaded);
* :mod:`rega.plan.shape`: the counts read from the meta model (parameters, layers, LoRA inputs);
* :mod:`rega.plan.memory`: bytes per GPU by layout (DDP, FSDP2, HSDP), activations with and without checkpointing;
* :mod:`rega.plan.flops`: FLOPs per token and per optimizer step, step and run time at a stated MFU;
* :mod:`rega.plan.cards`: the GPUs it plans for; :mod:`rega.plan.command`: the command and its table.

On the CLI floor: it reads the fit's configuration with :func:`rega.lightning_cli.resolve_fit_config`.
"""
