"""Resource validation: R4B structure, required bindings and the checks the models skip.

Owns: turning a JSON resource into a list of ``Issue``s. Must not: store, log values, or import
flask.
"""
