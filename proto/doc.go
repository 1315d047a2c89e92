// Package proto holds the H3X wire protocol's protobuf definitions
// (h3x.proto). The generated Go code lives in proto/h3xpb and is checked in;
// regenerate it with
//
//	go generate ./proto
//
// which runs generate.sh (Debian's protobuf-compiler plus protoc-gen-go
// v1.36.12, installed into a temporary directory).
package proto

//go:generate ./generate.sh
