"""Structured output: decoding constrained to a JSON schema, any JSON object, a regex, an EBNF
grammar or a list of choices, with xgrammar (docs/STRUCTURED_OUTPUT.md).

* :mod:`.grammar`: the request's format as xgrammar source, the front's syntax check (errors
  name the problem) and :class:`~.grammar.GrammarCache`, the engine core's bounded LRU of
  compiled grammars, compiled on a thread pool off the engine's critical path;
* :mod:`.manager`: :class:`~.manager.StructuredOutputManager`, the engine core's collaborator:
  one grammar matcher per constrained sequence, advanced with the tokens the scheduler accepted,
  and each step's token bitmask (:class:`~gpu_worker.core.types.GrammarBitmask`);
* :mod:`.bitmask`: applying a step's bitmask to the logits rows on the device in one op.

xgrammar (and torch) are imported lazily, so an engine that never sees a constrained request
never loads them.
"""
