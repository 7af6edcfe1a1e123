"""Live monitoring: the Monitor (setup, on_step, evaluate, finish, state) and its distributed helpers."""
