//! Every way the SDK's [`NatsOptions`] authenticates and secures a connection, against real
//! nats-servers that demand it: user/password (as options, as URL userinfo, from a Secret-like
//! directory), token, nkey, TLS verified against a test CA, and a client certificate. Wrong
//! credentials and an unknown CA fail with their own kind and the server's words, and never
//! echo the secret.

use conveyor::Client;
use conveyor::connect::{Auth, FailureKind, NatsOptions, Secret, keys};
use conveyor_testkit::{NatsServer, ServerAuth};

const PASSWORD: &str = "s3cret-Pa55word";

async fn works(options: &NatsOptions) {
    let client = options
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting with {} credentials: {e}", options.auth.kind()));
    // A round trip proves the server accepted the connection.
    client.flush().await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.query_account().await.unwrap();
}

#[tokio::test]
async fn user_and_password_as_options_url_userinfo_and_secret_directory() {
    let nats = NatsServer::builder()
        .user_password("conveyor", PASSWORD)
        .start()
        .await
        .unwrap();
    let options = NatsOptions::new(&nats.url())
        .unwrap()
        .auth(Auth::UserPassword {
            user: "conveyor".into(),
            password: Secret::new(PASSWORD),
        })
        .unwrap();
    works(&options).await;

    // async-nats ignores userinfo; the SDK turns it into credentials.
    let with_userinfo = format!("nats://conveyor:{PASSWORD}@127.0.0.1:{}", nats.port());
    Client::connect(&with_userinfo).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(keys::USER), "conveyor").unwrap();
    std::fs::write(dir.path().join(keys::PASSWORD), format!("{PASSWORD}\n")).unwrap();
    let from_dir = NatsOptions::new(&nats.url())
        .unwrap()
        .credentials_dir(dir.path())
        .unwrap();
    works(&from_dir).await;
}

#[tokio::test]
async fn token_and_nkey() {
    let nats = NatsServer::builder()
        .token("t0ken-xyz")
        .start()
        .await
        .unwrap();
    let token = NatsOptions::new(&nats.url())
        .unwrap()
        .auth(Auth::Token(Secret::new("t0ken-xyz")))
        .unwrap();
    works(&token).await;
    Client::connect(&format!("nats://t0ken-xyz@127.0.0.1:{}", nats.port()))
        .await
        .unwrap();

    let nats = NatsServer::builder().nkey().start().await.unwrap();
    let Some(ServerAuth::Nkey { seed, .. }) = nats.auth().cloned() else {
        panic!("an nkey server")
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(keys::NKEY), format!("{seed}\n")).unwrap();
    let nkey = NatsOptions::new(&nats.url())
        .unwrap()
        .credentials_dir(dir.path())
        .unwrap();
    assert_eq!(nkey.auth.kind(), "nkey");
    works(&nkey).await;
}

#[tokio::test]
async fn a_wrong_password_is_an_auth_failure_that_does_not_echo_it() {
    let nats = NatsServer::builder()
        .user_password("conveyor", PASSWORD)
        .start()
        .await
        .unwrap();
    let wrong = format!("nats://conveyor:not-{PASSWORD}@127.0.0.1:{}", nats.port());
    let error = Client::connect(&wrong).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Auth, "{error}");
    let text = error.to_string();
    assert!(
        text.to_lowercase().contains("authorization violation"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    // No credentials at all is the same failure.
    let none = NatsOptions::new(&nats.url())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert_eq!(none.kind, FailureKind::Auth, "{none}");
}

#[tokio::test]
async fn tls_verified_against_the_test_ca_and_refused_without_it() {
    let nats = NatsServer::builder().tls().start().await.unwrap();
    let tls = nats.tls().unwrap().clone();
    let options = NatsOptions::new(&nats.tls_url())
        .unwrap()
        .tls_dir(&tls.client_dir);
    assert!(options.tls.required);
    works(&options).await;

    // The system roots do not know the test CA.
    let unknown = NatsOptions::new(&nats.tls_url())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert_eq!(unknown.kind, FailureKind::Tls, "{unknown}");
    assert!(
        unknown.message.to_lowercase().contains("certificate"),
        "{unknown}"
    );
}

#[tokio::test]
async fn tls_with_a_client_certificate() {
    let nats = NatsServer::builder()
        .tls_verify_clients()
        .start()
        .await
        .unwrap();
    let tls = nats.tls().unwrap().clone();
    let options = NatsOptions::new(&nats.url())
        .unwrap()
        .tls_dir(&tls.client_dir);
    assert!(options.tls.client_cert.is_some());
    works(&options).await;
}
