"""Every private name of another library that tensornet relies on, one module per library.

peft, transformers, bitsandbytes and torch change their private names between releases
without notice. tensornet reaches each one only from here, each use commented with what
it is for and what breaks if it moves, and the tests check every one of them against the
installed libraries (``tests/test_compat.py``: bitsandbytes, transformers;
``tests/test_compat_peft.py``: peft, torch), so an upgrade that moves a name fails loudly
there (and says which shim to fix) rather than silently somewhere else. Tests also check
that no foreign underscore name is used outside this package.

Modules: :mod:`.bnb` (bitsandbytes), :mod:`.hf` (transformers), :mod:`.peft`,
:mod:`.torch`. :mod:`.bnb` and :mod:`.hf` import their library only when a shim is
called. :mod:`.peft` and :mod:`.torch` subclass their library's classes (the hooks a peft
tuner, a peft layer and a torch module override) and so import it with themselves; only
:mod:`tensornet.adapters` imports them, so importing tensornet's core imports neither.
"""
