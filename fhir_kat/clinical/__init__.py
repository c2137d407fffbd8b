"""Clinical rules over artifacts: the program protocol (``protocol``) and dose safety
(``dose``).

Owns: reading ``mappings/program/protocol.yaml`` and pure checks returning ``Issue``s. Must not:
invent clinical values (ranges, weights, schedules live in configuration), store, call HTTP, or
read the clock.
"""
