"""Templated batches (diffbatch extension): `template` times `rows` / `rows_file_id` on POST /v1/batches, and
`diffbatch submit --template T.json --rows FILE`."""

from __future__ import annotations

import csv
import io
import json

import pytest

from cli.main import main
from db import repo
from db.models import RequestStatus
from tests.harness import Service
from tests.live_server import live_server
from worker import validation

CHAT = "/v1/chat/completions"
TEMPLATE = {"model": "tiny", "max_tokens": 4,
            "messages": [{"role": "system", "content": "You translate to {{lang}}."},
                         {"role": "user", "content": "Translate: {{ text }}"}]}


@pytest.fixture
def svc(tmp_path, tiny_model):
    """The API with no worker thread: batches stay queued, their input files and requests can be read."""
    return Service.embedded(tmp_path, tiny_model)


def _csv(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode()


def _create(svc: Service, **body) -> dict:
    response = svc.client.post("/v1/batches", json={"endpoint": CHAT, "template": TEMPLATE, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _refused(svc: Service, **body) -> dict:
    response = svc.client.post("/v1/batches", json={"endpoint": CHAT, "template": TEMPLATE, **body})
    assert response.status_code == 400, response.text
    return response.json()["error"]


def _messages(line: dict) -> list[str]:
    return [m["content"] for m in line["body"]["messages"]]


def test_a_thousand_csv_rows_make_a_thousand_requests_with_their_custom_ids(svc):
    rows = [["id", "lang", "text"]] + [[f"doc-{i}", "French" if i % 2 else "German", f"sentence {i}"]
                                       for i in range(1000)]
    rows[500][2] = 'She said "hi",\nthen left. {{lang}} stays as written'  # quotes, comma, newline, braces
    uploaded = svc.upload(_csv(rows), "sentences.csv")
    batch = _create(svc, rows_file_id=uploaded["id"], custom_id_column="id")

    lines = svc.lines_of(batch["input_file_id"])
    assert [line["custom_id"] for line in lines] == [f"doc-{i}" for i in range(1000)]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", CHAT)}
    assert _messages(lines[0]) == ["You translate to German.", "Translate: sentence 0"]
    assert _messages(lines[499]) == ["You translate to French.",
                                     'Translate: She said "hi",\nthen left. {{lang}} stays as written']
    assert lines[7]["body"]["max_tokens"] == 4 and lines[7]["body"]["model"] == "tiny"

    validation.validate_batch(svc.runtime, batch["id"])
    stored = svc.client.get(f"/v1/batches/{batch['id']}").json()
    assert stored["status"] == "in_progress" and stored["request_counts"]["total"] == 1000
    with svc.runtime.session() as session:
        requests = repo.requests_of(session, batch_id=batch["id"], statuses=[RequestStatus.pending], limit=2000)
    assert [r.custom_id for r in requests] == [f"doc-{i}" for i in range(1000)]


def test_jsonl_rows_fill_nested_strings_and_take_numbers_and_booleans(svc):
    template = {"model": "tiny", "prompt": "{{n}} is odd: {{odd}}. {{fill:3}} {{ not a column! }}",
                "max_tokens": 2, "stop": ["{{stop}}", "END"]}
    rows = [{"n": 1, "odd": True, "stop": "\n\n", "key": 10}, {"n": 2.5, "odd": False, "stop": "}}", "key": "b"}]
    content = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"\n"  # a blank line is no row
    uploaded = svc.upload(content, "rows.jsonl")
    response = svc.client.post("/v1/batches", json={"endpoint": "/v1/completions", "template": template,
                                                    "rows_file_id": uploaded["id"], "custom_id_column": "key"})
    assert response.status_code == 200, response.text
    lines = svc.lines_of(response.json()["input_file_id"])
    assert [line["custom_id"] for line in lines] == ["10", "b"]
    assert [line["body"]["prompt"] for line in lines] == [
        "1 is odd: true. {{fill:3}} {{ not a column! }}", "2.5 is odd: false. {{fill:3}} {{ not a column! }}"]
    assert [line["body"]["stop"] for line in lines] == [["\n\n", "END"], ["}}", "END"]]


def test_inline_rows_run_to_completion_with_row_numbers_as_custom_ids(service):
    rows = [{"lang": "Python", "text": 'print("a")'}, {"lang": "C", "text": "x\ny"}]
    response = service.client.post("/v1/batches", json={"endpoint": CHAT, "template": TEMPLATE, "rows": rows,
                                                         "priority": 3})
    assert response.status_code == 200, response.text
    done = service.wait(response.json()["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert done["priority"] == 3
    assert sorted(line["custom_id"] for line in service.lines_of(done["output_file_id"])) == ["row-1", "row-2"]
    assert _messages(service.lines_of(done["input_file_id"])[1])[1] == "Translate: x\ny"


HEADER = ["id", "lang", "text"]


@pytest.mark.parametrize(("filename", "content", "param", "code", "message"), [
    ("t.csv", _csv([HEADER, ["a", "French", "x"], ["b", "German"]]), "rows[1]", "invalid_row",
     "row 2 (line 3): 2 fields; the header has 3 columns (id, lang, text)."),
    ("t.csv", _csv([["id", "text"], ["a", "x"]]), "rows[0].lang", "missing_column",
     "row 1 (line 2): column 'lang' is missing (used by body.messages[0].content)."),
    ("t.csv", _csv([HEADER, ["a", "French", "x"], ["a", "German", "y"]]), "rows[1].id", "duplicate_custom_id",
     "row 2 (line 3): custom_id 'a' appears more than once."),
    ("t.csv", _csv([HEADER, ["a", "French", "x"], ["", "German", "y"]]), "rows[1].id", "empty_custom_id",
     "row 2 (line 3): column 'id' (custom_id_column) is empty; each request needs a custom_id."),
    ("t.csv", _csv([HEADER, ["a", "French", "x"]]) + b"b,\xff,y\n", "rows[1]", "invalid_encoding",
     "row 2 (line 3): not valid UTF-8."),
    ("t.csv", _csv([["id", "lang", "lang"]]), "rows_file_id", "duplicate_column",
     "rows_file_id: the CSV header names column 'lang' twice."),
    ("t.csv", b"\n\n", "rows_file_id", "empty_file", "rows_file_id: the CSV file has no header row"),
    ("t.csv", _csv([HEADER]), "rows_file_id", "empty_file", "rows_file_id: no rows"),
    ("t.jsonl", b'{"id": "a", "lang": "C", "text": "x"}\n\n{"id": "b", "lang": "C", "text": \n',
     "rows[1]", "invalid_row", "row 2 (line 3): not valid JSON"),
    ("t.jsonl", b'{"id": "a", "lang": null, "text": "x"}\n', "rows[0].lang", "invalid_value",
     "row 1 (line 1): column 'lang' is null (used by body.messages[0].content)"),
    ("t.jsonl", b'["a", "C", "x"]\n', "rows[0]", "invalid_row", "row 1 (line 1): must be a JSON object"),
    ("t.jsonl", b'{"lang": "C", "text": "x"}\n', "rows[0].id", "missing_column",
     "row 1 (line 1): column 'id' (custom_id_column) is missing."),
    ("t.txt", b"id,lang,text\n", "rows_file_id", "invalid_rows_file", "rows_file_id: file "),
])
def test_bad_rows_files_are_400s_naming_row_and_column(svc, filename, content, param, code, message):
    uploaded = svc.upload(content, filename)
    error = _refused(svc, rows_file_id=uploaded["id"], custom_id_column="id")
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"].startswith(message), error["message"]
    files = svc.client.get("/v1/files").json()["data"]
    assert [f["id"] for f in files] == [uploaded["id"]]  # the refused batch left no input file behind


def test_bad_inline_rows_and_templates_are_400s(svc):
    good = {"lang": "C", "text": "x"}
    error = _refused(svc, rows=[good] * 16 + [{"text": "y"}])
    assert error["param"] == "rows[16].lang"
    assert error["message"] == "row 17: column 'lang' is missing (used by body.messages[0].content)."
    assert _refused(svc, rows=[good, "C"])["param"] == "rows[1]"
    assert _refused(svc, rows=[{**good, "lang": {"a": 1}}])["message"].startswith(
        "row 1: column 'lang' is a JSON object")
    assert _refused(svc, rows=[])["code"] == "empty_file"
    wrong = _refused(svc, rows=[good], template={**TEMPLATE, "temperature": "{{lang}}"})
    assert wrong["param"] == "template.temperature" and wrong["message"].startswith("row 1: body.temperature")
    unnamed = _refused(svc, rows=[good], template={**TEMPLATE, "model": "{{model}}"})
    assert unnamed["param"] == "rows[0].model"


def test_templated_batches_are_limited_like_files(svc):
    good = {"lang": "C", "text": "x"}
    svc.settings.max_line_bytes = 1024
    too_long = _refused(svc, rows=[good, {**good, "text": "y" * 2000}])
    assert (too_long["param"], too_long["code"]) == ("rows[1]", "line_too_large")
    svc.settings.max_batch_requests = 2
    uploaded = svc.upload(_csv([["lang", "text"]] + [["C", str(i)] for i in range(3)]), "three.csv")
    too_many = _refused(svc, rows_file_id=uploaded["id"])
    assert (too_many["param"], too_many["code"]) == ("rows_file_id", "batch_too_large")
    assert _refused(svc, rows=[good] * 3)["code"] == "batch_too_large"


def test_a_template_takes_exactly_one_source_of_rows(svc):
    uploaded = svc.upload(_csv([["lang", "text"], ["C", "x"]]), "rows.csv")
    assert _refused(svc)["param"] == "rows"
    assert _refused(svc, rows=[{"lang": "C", "text": "x"}], rows_file_id=uploaded["id"])["param"] == "rows"
    assert _refused(svc, rows=[], input_file_id=uploaded["id"])["param"] == "template"
    alone = svc.client.post("/v1/batches", json={"endpoint": CHAT, "rows": [{"lang": "C"}]})
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "rows"
    missing = svc.client.post("/v1/batches", json={"endpoint": CHAT, "template": TEMPLATE, "rows_file_id": "file-x"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "rows_file_id"


def test_cli_submits_a_template_and_a_csv_file(service, tmp_path, capsys):
    template = tmp_path / "t.json"
    template.write_text(json.dumps(TEMPLATE))
    rows = tmp_path / "rows.csv"
    rows.write_bytes(_csv([HEADER, ["q1", "French", "cat"], ["q2", "German", 'a "dog"']]))
    with live_server(service.client.app) as url:
        assert main(["submit", "--template", str(template), "--rows", str(rows), "--custom-id-column", "id",
                     "--priority", "5", "--wait", "--url", url]) == 0
        batch_id = capsys.readouterr().out.strip()
        assert batch_id.startswith("batch_")
        done = service.client.get(f"/v1/batches/{batch_id}").json()
        assert done["status"] == "completed" and done["endpoint"] == CHAT and done["priority"] == 5
        assert sorted(line["custom_id"] for line in service.lines_of(done["output_file_id"])) == ["q1", "q2"]
        assert main(["submit", "--template", str(template), "--url", url]) == 2  # --rows is missing
        assert "--template needs --rows" in capsys.readouterr().err

        template.write_text(json.dumps({"model": "tiny", "input": "Say {{text}}.", "max_output_tokens": 4}))
        assert main(["submit", "--template", str(template), "--rows", str(rows), "--url", url]) == 0
        responses = service.client.get(f"/v1/batches/{capsys.readouterr().out.strip()}").json()
        assert responses["endpoint"] == "/v1/responses"  # read from the template's `input`


def test_placeholders_are_found_in_linear_time_and_unclosed_ones_stay_text():
    from api.templated import Template

    template = Template({"prompt": "{{ first name }} and {{a.b-c}}, {{ 1x }}, {{open" + " " * 200_000})
    assert template.columns == {"first name": "body.prompt", "a.b-c": "body.prompt"}
    body = template.render({"first name": "Ada", "a.b-c": "B"})
    assert body["prompt"].startswith("Ada and B, {{ 1x }}, {{open   ")
