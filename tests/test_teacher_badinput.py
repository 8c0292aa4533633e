"""The bad-input and abuse table (bench/teacher_abuse.py) run against an in-process replica: every malformed or
hostile request gets its expected status, and a well-behaved client sharing the replica is served throughout,
its signals unchanged."""

from __future__ import annotations

from atkd.services.teacher.config import TeacherConfig
from bench.teacher_abuse import Target, run_cases, serve_config, table, write_tokens
from tests.teacher_harness import ServerThread


def test_every_bad_or_hostile_request_gets_its_status_and_a_good_client_is_served(tiny_model_dir,
                                                                                tiny_teacher_engine, tmp_path):
    config = TeacherConfig(model=tiny_model_dir, port=0, http_port=0, **serve_config(write_tokens(tmp_path)))
    server = ServerThread(config, lambda: tiny_teacher_engine).start()
    try:
        rows, good = run_cases(Target(server.address, server.server.http_port))
    finally:
        server.close()
    print(table(rows, good))
    assert [row.case.name for row in rows if not row.as_expected] == []
    assert good.errors == [] and all(row.served >= 1 for row in rows)
