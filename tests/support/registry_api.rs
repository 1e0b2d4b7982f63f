//! A client of the registry's HTTP API for tests: every answer must be
//! JSON in the API's content type.

use reqwest::Method;
use serde_json::{json, Value as Json};

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub async fn call(&self, method: Method, path: &str, body: Option<Json>) -> (u16, Json) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.header("content-type", "application/vnd.schemaregistry.v1+json").body(body.to_string());
        }
        let response = request.send().await.expect("registry answers");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(content_type.as_deref(), Some("application/vnd.schemaregistry.v1+json"), "{path}");
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON {text:?}: {e}")))
    }

    pub async fn get(&self, path: &str) -> (u16, Json) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Json) -> (u16, Json) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Json) -> (u16, Json) {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Json) {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn register(&self, subject: &str, schema: &Json) -> (u16, Json) {
        self.post(&format!("/subjects/{subject}/versions"), json!({"schema": schema.to_string()})).await
    }
}

/// The `error_code` of an error body.
pub fn error_code(body: &Json) -> i64 {
    body["error_code"].as_i64().unwrap_or_else(|| panic!("no error_code in {body}"))
}

/// A registry of the test's own and a client of it.
pub async fn api() -> (Api, kawka_registry::RunningRegistry) {
    let registry = super::start_registry().await;
    (Api { http: reqwest::Client::new(), base: registry.url() }, registry)
}
