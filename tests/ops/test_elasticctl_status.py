"""``elasticctl status`` shows why a node's workers failed: command, exit code, last lines."""

from __future__ import annotations

from ops.cli import failure_lines


def test_each_node_with_a_last_failure_gets_its_command_exit_code_and_output_tail() -> None:
    members = {
        "node-b": {"state": "running"},
        "node-a": {
            "state": "joining",
            "last_failure": {
                "command": ["/venv/bin/python", "-P", "my loop.py"],
                "local_rank": 0,
                "returncode": 1,
                "output_tail": ["Traceback (most recent call last):", "ValueError: boom"],
            },
        },
    }
    assert failure_lines(members) == [
        "",
        "last failure on node-a: local rank 0, exit code 1",
        "  command: /venv/bin/python -P 'my loop.py'",
        "  | Traceback (most recent call last):",
        "  | ValueError: boom",
    ]


def test_nodes_without_failures_add_no_lines() -> None:
    assert failure_lines({"node-a": {"state": "running"}, "node-b": "not a mapping"}) == []
