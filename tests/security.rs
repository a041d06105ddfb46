//! TLS and bearer tokens with real processes on loopback: a router whose
//! public port takes TLS and tokens, talking mutual TLS to its engine.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use heterospec_proto::engine::v1 as epb;
use heterospec_proto::engine::v1::engine_client::EngineClient;
use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_client::GenerationClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA, a server certificate for 127.0.0.1 and a client certificate,
/// written as PEM files into `dir`.
fn write_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    write("ca.pem", ca.pem());
    for (name, purpose, names) in [
        (
            "server",
            ExtendedKeyUsagePurpose::ServerAuth,
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
        ),
        (
            "client",
            ExtendedKeyUsagePurpose::ClientAuth,
            vec!["router".to_string()],
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &ca).unwrap();
        write(&format!("{name}.pem"), cert.pem());
        write(&format!("{name}.key"), key.serialize_pem());
    }
    write("tokens", "# test tokens\nsecret-token-1\n".into());
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

async fn tls_channel(url: &str, dir: &Path, identity: bool) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(dir.join("ca.pem")).unwrap()));
    if identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(dir.join("client.pem")).unwrap(),
            std::fs::read(dir.join("client.key")).unwrap(),
        ));
    }
    Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn tls_health(url: &str, dir: &Path) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let Ok(channel) = tls_channel(url, dir, false).await else {
        return -1;
    };
    match HealthClient::new(channel).check(HealthCheckRequest::default()).await {
        Ok(r) => r.into_inner().status,
        Err(_) => -1,
    }
}

/// Generates with `token` (if any) as the bearer token.
async fn generate(
    client: &mut GenerationClient<Channel>,
    token: Option<&str>,
    prompt: &str,
) -> Result<Vec<u32>, tonic::Status> {
    let mut request = tonic::Request::new(chat_request(prompt, 8));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let mut stream = client.generate(request).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(r) = stream.message().await? {
        ids.extend(r.token_ids);
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tokens_and_mutual_tls_to_the_engine() {
    let dir: PathBuf = std::env::temp_dir().join(format!("heterospec-pki-{}", std::process::id()));
    write_pki(&dir);
    // Plaintext health-only ports, for probes that cannot speak TLS.
    let (engine_health, router_health) = (free_port(), free_port());
    let engine = Proc::start(&engine_args(
        "127.0.0.1:0",
        &[
            "--health-listen",
            &format!("127.0.0.1:{engine_health}"),
            "--tls-cert",
            &path(&dir, "server.pem"),
            "--tls-key",
            &path(&dir, "server.key"),
            "--tls-client-ca",
            &path(&dir, "ca.pem"),
        ],
    ));
    let engine_url = format!("https://127.0.0.1:{}", engine.addr.port());
    let router = Proc::start(&router_args(
        std::slice::from_ref(&engine_url),
        free_port(),
        &[
            "--health-listen",
            &format!("127.0.0.1:{router_health}"),
            "--engine-tls-ca",
            &path(&dir, "ca.pem"),
            "--engine-tls-cert",
            &path(&dir, "client.pem"),
            "--engine-tls-key",
            &path(&dir, "client.key"),
            "--tls-cert",
            &path(&dir, "server.pem"),
            "--tls-key",
            &path(&dir, "server.key"),
            "--auth-tokens-file",
            &path(&dir, "tokens"),
        ],
    ));
    let url = format!("https://127.0.0.1:{}", router.addr.port());
    // Health is open (no token) and, over TLS, turns SERVING once the
    // router reached its engine through mutual TLS.
    let deadline = Instant::now() + Duration::from_secs(60);
    while tls_health(&url, &dir).await != SERVING {
        assert!(Instant::now() < deadline, "the router did not become SERVING over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same status on the plaintext health ports.
    assert_eq!(
        health_status(&format!("http://127.0.0.1:{router_health}")).await,
        SERVING
    );
    assert_eq!(
        health_status(&format!("http://127.0.0.1:{engine_health}")).await,
        SERVING
    );
    assert_eq!(
        service_health(&format!("http://127.0.0.1:{engine_health}"), "liveness").await,
        SERVING
    );

    let mut client = GenerationClient::new(tls_channel(&url, &dir, false).await.unwrap());
    let solo = generate(&mut client, Some("secret-token-1"), "Name three colors.")
        .await
        .unwrap();
    assert_eq!(solo.len(), 8);
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        generate(&mut c1, Some("secret-token-1"), "Name three colors."),
        generate(&mut c2, Some("secret-token-1"), "Say hello."),
    );
    assert_eq!(a.unwrap(), solo);
    assert_eq!(b.unwrap().len(), 8);

    // Wrong or missing token: UNAUTHENTICATED, and the message says nothing
    // of what was wrong.
    for token in [Some("secret-token-2"), None] {
        let status = generate(&mut client, token, "Say hello.").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(!status.message().contains("secret"), "{status:?}");
    }
    let status = client.model_info(pb::ModelInfoRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A plaintext client gets nothing from the TLS port.
    let plain = format!("http://127.0.0.1:{}", router.addr.port());
    let refused = match GenerationClient::connect(plain).await {
        Err(_) => true,
        Ok(mut c) => c.model_info(pb::ModelInfoRequest {}).await.is_err(),
    };
    assert!(refused, "a plaintext client was served");

    // The engine answers only clients with a certificate from the CA.
    let without_cert = match tls_channel(&engine_url, &dir, false).await {
        Err(_) => true,
        Ok(channel) => EngineClient::new(channel)
            .info(epb::InfoRequest::default())
            .await
            .is_err(),
    };
    assert!(without_cert, "the engine served a client without a certificate");
    let with_cert = tls_channel(&engine_url, &dir, true).await.unwrap();
    assert!(EngineClient::new(with_cert)
        .info(epb::InfoRequest::default())
        .await
        .is_ok());

    let _ = std::fs::remove_dir_all(&dir);
}
