# shoal-injector: one static binary (rustls with ring) on an empty image,
# running as a non-root user. Built like agent.Dockerfile: the binary comes
# from the host,
#   RUSTFLAGS='-C target-feature=+crt-static' \
#     cargo build --profile release-injector --target x86_64-unknown-linux-gnu -p shoal-injector --bin shoal-injector
# with a context holding `shoal-injector`.
FROM scratch
COPY shoal-injector /shoal-injector
USER 65532:65532
# 8443/tcp webhook (HTTPS); 9090/tcp admin (/metrics, /livez, /readyz).
EXPOSE 8443/tcp 9090/tcp
ENTRYPOINT ["/shoal-injector"]
