"""Everything that builds and trains a model: the layer below results, reports and commands.

``activations`` (the one activation registry), ``models``, ``tasks``, ``inits`` (schemes),
``probes`` (statistics), ``optim`` (the flat (K, P) optimizer), ``bundle`` (what engines share),
``stacked`` (the hand-stacked MLP engine) and ``reference`` (the plain ``nn.Module`` +
``torch.optim`` loop every engine is tested against).

``names`` and ``schemes`` declare, without torch, what a spec may name (activations, architectures
and their settings, tasks, init schemes with their parameters, rule syntax); the spec reads them,
and the torch registries are keyed by the same names. Importing this package imports no torch.
"""
