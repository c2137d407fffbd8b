"""The program's standard instruments (PHQ-9, GAD-7, PCL-5, B-IPF): definitions, bands,
screen results and the outcome measure's arithmetic.

Owns: ``mappings/instruments/instruments.yaml`` and pure functions over scores. Must not: store,
call HTTP, or read the clock.
"""
