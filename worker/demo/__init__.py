"""The self-verifying demo, the child processes it and the tests start, the stream generator
and its independent oracle, and the sandbox as a subprocess (test helpers shipped with the
code)."""
