# Container images for the two binaries the chart and the operator run:
#   docker build --target voice-pod      -t ghcr.io/callmeback/voice-pod:0.1.0 .
#   docker build --target voice-operator -t ghcr.io/callmeback/voice-operator:0.1.0 .
# (the tags the VoiceDeployment default and the chart's appVersion name; push them
# to your registry and set spec.image / image.repository when it is another one).

# ---- build: one compile of the workspace for both binaries ----------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the committed Cargo.lock, exactly. The caches make rebuilds incremental
# (BuildKit); the binaries are copied out because cache mounts vanish after RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p voice-pod -p voice-operator \
      --bin voice-pod --bin voice-operator \
 && install -D target/release/voice-pod /out/voice-pod \
 && install -D target/release/voice-operator /out/voice-operator

# ---- runtime: glibc, libgcc and CA certificates, nothing else; uid 65532 ---------
# TLS is rustls (no OpenSSL); the binaries need only libc, libm and libgcc_s, which
# distroless/cc carries, plus its CA bundle for the providers' and Twilio's TLS.
FROM gcr.io/distroless/cc-debian12:nonroot AS voice-pod
COPY --from=build /out/voice-pod /usr/local/bin/voice-pod
# 8080: Twilio webhooks, media streams, the API; 9090: /metrics, /healthz, /readyz.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/voice-pod"]
CMD ["serve"]

FROM gcr.io/distroless/cc-debian12:nonroot AS voice-operator
COPY --from=build /out/voice-operator /usr/local/bin/voice-operator
# 8080: /metrics, /healthz, /readyz of the operator.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/voice-operator"]
CMD ["run"]
