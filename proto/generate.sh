#!/usr/bin/env bash
# Regenerates proto/h3xpb from proto/h3x.proto.
# Needs Debian's protobuf-compiler (apt-get install -y protobuf-compiler, libprotoc 3.21.12)
# and installs the pinned protoc-gen-go into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
GOBIN="$bin" go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
protoc --plugin=protoc-gen-go="$bin/protoc-gen-go" \
  --go_out=h3xpb --go_opt=paths=source_relative h3x.proto
