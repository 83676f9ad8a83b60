"""Every private name of another library that tensornet relies on, one module per library.

peft, transformers, bitsandbytes and torch change their private names between releases
without notice. tensornet reaches each one only from here, each use commented with what
it is for and what breaks if it moves, and ``tests/test_compat.py`` checks every one of
them against the installed libraries, so an upgrade that moves a name fails loudly there
(and says which shim to fix) rather than silently somewhere else. A test also checks that
no foreign underscore name is used outside this package.

Modules: :mod:`.bnb` (bitsandbytes), :mod:`.hf` (transformers), :mod:`.peft`,
:mod:`.torch`. Each imports its library only when a shim is called, so importing
tensornet's core never imports them.
"""
