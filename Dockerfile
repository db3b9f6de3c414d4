# syntax=docker/dockerfile:1
#
# imagemirror controller and CLI image.
#
#   docker build -t ghcr.io/imagemirror/imagemirror:0.1.0 .
#   docker run --rm ghcr.io/imagemirror/imagemirror:0.1.0 --help
#
# The binary links glibc, so the runtime image is distroless cc (glibc, libgcc, CA certificates,
# no shell); builder and runtime are both Debian 12 (bookworm), so the glibc versions match.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io registry and the target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin imagemirror \
 && install -D -m 0755 target/release/imagemirror /out/imagemirror

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="imagemirror" \
      org.opencontainers.image.description="Kubernetes operator and CLI that keeps container images mirrored between registries" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/imagemirror /imagemirror
USER 65532:65532
ENTRYPOINT ["/imagemirror"]
