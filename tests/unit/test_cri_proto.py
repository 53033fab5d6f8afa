"""The world tests' CRI client compiles Debian's api.proto; an older one imports gogo.proto, whose options
only steer Go code generation: without_gogo drops them so protoc needs no gogo sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.world.cri import without_gogo

GOGO_PROTO = """syntax = "proto3";

package runtime.v1;
option go_package = "k8s.io/cri-api/pkg/apis/runtime/v1";

import "github.com/gogo/protobuf/gogoproto/gogo.proto";

option (gogoproto.goproto_stringer_all) = false;
option (gogoproto.stringer_all) =  true;

message AuthConfig {
    string username = 1;
    string password = 2 [(gogoproto.moretags) = "datapolicy:\\"password\\""];
    string auth = 3 [deprecated = true, (gogoproto.nullable) = false];
    string server_address = 4;
}
"""


def test_gogo_import_and_options_are_dropped_and_the_rest_kept() -> None:
    stripped = without_gogo(GOGO_PROTO)
    assert "gogo" not in stripped
    assert 'option go_package = "k8s.io/cri-api/pkg/apis/runtime/v1";' in stripped
    assert "string username = 1;" in stripped
    assert "string password = 2;" in stripped
    assert "string auth = 3 [deprecated = true];" in stripped
    assert "string server_address = 4;" in stripped


def test_a_proto_without_gogo_is_left_as_it_is() -> None:
    plain = 'syntax = "proto3";\npackage p;\nmessage M { string a = 1 [debug_redact = true]; }\n'
    assert without_gogo(plain) == plain


def test_the_stripped_proto_compiles(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / "cri.proto").write_text(without_gogo(GOGO_PROTO))
    argv = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", "cri.proto"]
    assert protoc.main(argv) == 0
    assert (tmp_path / "cri_pb2.py").is_file()
