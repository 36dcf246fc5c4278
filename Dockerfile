# The p2psip image: one image for every service of a site (proxy, DHT node).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY dht_adaptor ./dht_adaptor
COPY admin_api ./admin_api
RUN pip install --no-cache-dir . && useradd --system --home-dir /data p2psip \
    && mkdir -p /data && chown p2psip /data
USER p2psip
ENV P2PSIP_DATA_DIR=/data
EXPOSE 5060/udp 5060/tcp
ENTRYPOINT ["p2psip"]
CMD ["run"]
