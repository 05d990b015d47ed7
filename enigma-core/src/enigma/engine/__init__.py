"""The engine: continuous batching over a paged KV cache (vLLM v1's design).

``Request`` (one sequence's state: computed tokens chase total tokens),
``PagedCache`` (KV blocks, reference counts, prefix caching), ``Scheduler``
(which requests run each step, under a token budget; preemption),
``Engine`` (one batched forward per step) and ``AsyncEngine`` (a background
step loop with async token streams).
"""
