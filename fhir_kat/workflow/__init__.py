"""The referral workflow's rules as data: eligibility triage and the Task state machine.

Owns: reading ``mappings/workflow/*.yaml`` and the pure decisions they drive. Must not: store,
call HTTP, or read the clock.
"""
