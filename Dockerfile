# The `flywheel` binary in a small runtime image (every service of the Helm chart runs it).
#
#   docker build -t flywheel:0.1.0 .
#
# Stage 1 builds with the toolchain the workspace pins (rust-version 1.95). librdkafka and
# OpenSSL are built from source by their crates (rdkafka's cmake-free build needs a C
# compiler, make and perl: all in the rust image).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin flywheel \
    && install -D target/release/flywheel /out/flywheel

# Stage 2: glibc and CA certificates, nothing else; runs as the unprivileged user 65532
# (the chart also sets runAsNonRoot and a read-only root file system).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/flywheel /usr/local/bin/flywheel
# The ledger's migrations are embedded in the binary (`flywheel migrate` applies them).
ENV FLYWHEEL_CACHE_DIR=/var/cache/flywheel
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flywheel"]
