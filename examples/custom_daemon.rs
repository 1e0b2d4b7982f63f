//! A custom kawka daemon: the stock pipeline plus a Rust upcaster for what
//! `schemas/upcasters.yaml` cannot say.
//!
//! `UserRegistered` v1 had no `country`. The declarative upcaster adds
//! `"unknown"`; this one derives it from the e-mail's top-level domain
//! instead, and replaces the declarative one for (UserRegistered, v1).
//!
//! ```sh
//! cargo run --example custom_daemon -- config/kawka.yaml
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use kawka::event::Event;
use kawka::value::{intern, Value};

const REGISTERED: &str = "com.example.users.UserRegistered";

/// v1 → v2: `fullName` becomes `name`; `country` from the e-mail domain.
fn registered_v1_to_v2(mut event: Event) -> Result<Vec<Event>, String> {
    let record = event.payload.as_record_mut().ok_or("UserRegistered v1 is a record")?;
    if !record.rename("fullName", intern("name")) {
        return Err("UserRegistered v1 without fullName".into());
    }
    let country = record
        .get("email")
        .and_then(Value::as_str)
        .and_then(|email| email.rsplit('.').next())
        .filter(|tld| tld.len() == 2)
        .map_or_else(|| "unknown".to_string(), str::to_uppercase);
    record.set(intern("country"), Value::from(country));
    event.version = 2;
    Ok(vec![event])
}

fn main() -> ExitCode {
    let config = std::env::args().nth(1).map_or_else(|| PathBuf::from("config/kawka.yaml"), PathBuf::from);
    kawka::telemetry::init(kawka::config::LogFormat::Human, "info");
    let builder = kawka::app::Builder::new().upcast_fn(REGISTERED, 1, registered_v1_to_v2);
    let settings = match builder.load(&config) {
        Ok(settings) => settings,
        Err(problems) => {
            eprint!("{problems}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match runtime.block_on(builder.run(settings, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kawka::event::Position;

    #[test]
    fn country_comes_from_the_email_domain() {
        let payload = serde_json::json!({"user_id": "u1", "seq": 1, "fullName": "Ada", "email": "ada@example.pl"});
        let event = Event {
            event_type: intern(REGISTERED),
            version: 1,
            payload: Value::from_json(&payload),
            key: Value::Null,
            position: Position { topic: "users", partition: 0, offset: 0 },
            timestamp: None,
        };
        let out = registered_v1_to_v2(event).expect("upcasts");
        assert_eq!(out[0].version, 2);
        assert_eq!(
            out[0].payload.to_json(),
            serde_json::json!({"user_id": "u1", "seq": 1, "name": "Ada", "email": "ada@example.pl", "country": "PL"})
        );
    }
}
