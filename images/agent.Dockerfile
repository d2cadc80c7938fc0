# shoal-agent: one static binary on an empty image, running as a non-root user.
# No registry is needed: `.ci/injector.sh images` builds the binary on the host
#   RUSTFLAGS='-C target-feature=+crt-static' \
#     cargo build --release --target x86_64-unknown-linux-gnu -p shoal-agent --bin shoal-agent
# and builds this file with a context holding `shoal-agent` and `rootfs/`
# (an empty var/lib/shoal owned by 65532, where the agent keeps its data).
FROM scratch
COPY --chown=65532:65532 rootfs/ /
COPY shoal-agent /shoal-agent
ENV SHOAL_DATA_DIR=/var/lib/shoal
WORKDIR /var/lib/shoal
USER 65532:65532
# 4700/tcp (app API) listens on loopback only; 4701/udp mesh; 4702/tcp admin.
EXPOSE 4701/udp 4702/tcp
ENTRYPOINT ["/shoal-agent"]
