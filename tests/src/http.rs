//! The request-and-read chain most tests end with, written once: a request
//! that fails or a body that does not parse is the test's failure, with the
//! URL in the message.

use serde_json::Value;

/// Sends a request and reads its whole body, whatever the status: the
/// caller asserts on the status inside the body (the APIs put it there) or
/// on what the body says.
pub trait Fetch {
    /// The body as JSON.
    fn fetch_json(self) -> impl Future<Output = Value> + Send;
    /// The body as text (a Prometheus scrape, an error page).
    fn fetch_text(self) -> impl Future<Output = String> + Send;
}

impl Fetch for reqwest::RequestBuilder {
    async fn fetch_json(self) -> Value {
        let response = send(self).await;
        let url = response.url().clone();
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{url}: the body is not JSON: {e}"))
    }

    async fn fetch_text(self) -> String {
        let response = send(self).await;
        let url = response.url().clone();
        response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{url}: reading the body: {e}"))
    }
}

async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"))
}
