"""Clinical rules over artifacts: the program protocol and dose checks.

Owns: reading ``mappings/program/protocol.yaml`` and pure checks returning Issues. Must not:
store, call HTTP, or read the clock.
"""
