//! The small expression language of connector files.
//!
//! ```text
//! name                 field of the event (after upcasting)
//! address.city         nested field
//! $key $key.id         the Kafka key (a field of it, for Avro record keys)
//! $topic $partition $offset $timestamp $event_type
//! 'text' 42 -1.5 true false null      literals ('' inside quotes is a quote)
//! lower(x) upper(x) trim(x) concat(a, ' ', b) coalesce(a, b, 'none')
//! to_string(x) to_int(x) to_float(x)
//! ```
//!
//! YAML numbers and booleans are literals too: `on_hand: 0` sets zero.
//! Expressions are parsed once, when the configuration is validated.

use std::fmt;

use crate::event::{Event, Position};
use crate::value::{intern, Name, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    /// A path of record fields in the event payload.
    Field(Vec<Name>),
    Meta(Meta),
    /// A path inside the decoded key (`$key.id`).
    KeyField(Vec<Name>),
    Call(Function, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    Key,
    Topic,
    Partition,
    Offset,
    Timestamp,
    EventType,
}

impl Meta {
    /// Its value for an event of `event_type` read at `position`.
    pub fn value(self, event_type: &str, key: &Value, position: Position, timestamp: Option<i64>) -> Value {
        match self {
            Meta::Key => key.clone(),
            Meta::Topic => Value::Str(position.topic.into()),
            Meta::Partition => Value::Int(i64::from(position.partition)),
            Meta::Offset => Value::Int(position.offset),
            Meta::Timestamp => timestamp.map_or(Value::Null, Value::Int),
            Meta::EventType => Value::Str(event_type.into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Lower,
    Upper,
    Trim,
    Concat,
    Coalesce,
    ToString,
    ToInt,
    ToFloat,
}

impl Function {
    const ALL: [(&'static str, Function); 8] = [
        ("lower", Function::Lower),
        ("upper", Function::Upper),
        ("trim", Function::Trim),
        ("concat", Function::Concat),
        ("coalesce", Function::Coalesce),
        ("to_string", Function::ToString),
        ("to_int", Function::ToInt),
        ("to_float", Function::ToFloat),
    ];

    fn arity(self) -> (usize, usize) {
        match self {
            Function::Concat | Function::Coalesce => (1, usize::MAX),
            _ => (1, 1),
        }
    }
}

/// Why an expression could not be parsed; `column` counts characters from 1.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (at character {column} of `{text}`)")]
pub struct ParseError {
    pub text: String,
    pub column: usize,
    pub message: String,
}

/// Why an expression could not be evaluated on one event: a permanent error
/// of that event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("field `{0}` is not in the event")]
    MissingField(String),
    #[error("field `{0}` is not in the key")]
    MissingKeyField(String),
    #[error("{function}() cannot take {found}")]
    BadArgument { function: &'static str, found: String },
}

pub fn parse(text: &str) -> Result<Expr, ParseError> {
    let mut parser = ExprParser { text, chars: text.char_indices().collect(), at: 0 };
    let expr = parser.expr()?;
    parser.skip_spaces();
    if parser.at < parser.chars.len() {
        return Err(parser.error("unexpected text after the expression"));
    }
    Ok(expr)
}

struct ExprParser<'t> {
    text: &'t str,
    chars: Vec<(usize, char)>,
    at: usize,
}

impl ExprParser<'_> {
    fn error(&self, message: &str) -> ParseError {
        ParseError { text: self.text.to_string(), column: self.at + 1, message: message.to_string() }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).map(|(_, c)| *c)
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn identifier(&mut self) -> Option<String> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.at += 1;
        }
        (self.at > start).then(|| self.slice(start, self.at).to_string())
    }

    fn slice(&self, start: usize, end: usize) -> &str {
        let from = self.chars[start].0;
        let to = self.chars.get(end).map_or(self.text.len(), |(i, _)| *i);
        &self.text[from..to]
    }

    /// `ident(.ident)*` after the first identifier has been read.
    fn path_rest(&mut self, first: &str) -> Result<Vec<Name>, ParseError> {
        let mut path = vec![intern(first)];
        while self.peek() == Some('.') {
            self.at += 1;
            let name = self.identifier().ok_or_else(|| self.error("expected a field name after `.`"))?;
            path.push(intern(&name));
        }
        Ok(path)
    }

    fn expr(&mut self) -> Result<Expr, ParseError> {
        self.skip_spaces();
        match self.peek() {
            None => Err(self.error("expected an expression")),
            Some('\'') => self.string(),
            Some('$') => self.meta(),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => self.number(),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let start = self.at;
                let name = self.identifier().expect("peeked an identifier character");
                match name.as_str() {
                    "true" => return Ok(Expr::Literal(Value::Bool(true))),
                    "false" => return Ok(Expr::Literal(Value::Bool(false))),
                    "null" => return Ok(Expr::Literal(Value::Null)),
                    _ => {}
                }
                self.skip_spaces();
                if self.peek() == Some('(') {
                    self.call(&name, start)
                } else {
                    Ok(Expr::Field(self.path_rest(&name)?))
                }
            }
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn call(&mut self, name: &str, start: usize) -> Result<Expr, ParseError> {
        let Some(&(_, function)) = Function::ALL.iter().find(|(n, _)| *n == name) else {
            self.at = start;
            let known: Vec<_> = Function::ALL.iter().map(|(n, _)| *n).collect();
            return Err(self.error(&format!("unknown function `{name}` (known: {})", known.join(", "))));
        };
        self.at += 1; // (
        let mut args = Vec::new();
        self.skip_spaces();
        if self.peek() == Some(')') {
            self.at += 1;
        } else {
            loop {
                args.push(self.expr()?);
                self.skip_spaces();
                match self.peek() {
                    Some(',') => self.at += 1,
                    Some(')') => {
                        self.at += 1;
                        break;
                    }
                    _ => return Err(self.error("expected `,` or `)`")),
                }
            }
        }
        let (min, max) = function.arity();
        if args.len() < min || args.len() > max {
            self.at = start;
            return Err(self.error(&format!("{name}() takes {}", arity_text(min, max))));
        }
        Ok(Expr::Call(function, args))
    }

    fn string(&mut self) -> Result<Expr, ParseError> {
        let start = self.at;
        self.at += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                None => {
                    self.at = start;
                    return Err(self.error("unterminated string"));
                }
                Some('\'') if self.chars.get(self.at + 1).map(|(_, c)| *c) == Some('\'') => {
                    text.push('\'');
                    self.at += 2;
                }
                Some('\'') => {
                    self.at += 1;
                    return Ok(Expr::Literal(Value::Str(text.into())));
                }
                Some(c) => {
                    text.push(c);
                    self.at += 1;
                }
            }
        }
    }

    fn number(&mut self) -> Result<Expr, ParseError> {
        let start = self.at;
        self.at += 1;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_') {
            self.at += 1;
        }
        let text = self.slice(start, self.at).replace('_', "");
        if let Ok(int) = text.parse::<i64>() {
            return Ok(Expr::Literal(Value::Int(int)));
        }
        match text.parse::<f64>() {
            Ok(float) if float.is_finite() => Ok(Expr::Literal(Value::Float(float))),
            _ => {
                self.at = start;
                Err(self.error("not a number"))
            }
        }
    }

    fn meta(&mut self) -> Result<Expr, ParseError> {
        let start = self.at;
        self.at += 1;
        let name = self.identifier().unwrap_or_default();
        let meta = match name.as_str() {
            "key" => Meta::Key,
            "topic" => Meta::Topic,
            "partition" => Meta::Partition,
            "offset" => Meta::Offset,
            "timestamp" => Meta::Timestamp,
            "event_type" => Meta::EventType,
            _ => {
                self.at = start;
                return Err(
                    self.error("unknown variable (known: $key, $topic, $partition, $offset, $timestamp, $event_type)")
                );
            }
        };
        if meta == Meta::Key && self.peek() == Some('.') {
            self.at += 1;
            let first = self.identifier().ok_or_else(|| self.error("expected a field name after `.`"))?;
            return Ok(Expr::KeyField(self.path_rest(&first)?));
        }
        Ok(Expr::Meta(meta))
    }
}

fn arity_text(min: usize, max: usize) -> String {
    match (min, max) {
        (1, 1) => "one argument".to_string(),
        (min, usize::MAX) => format!("at least {min} argument(s)"),
        (min, max) => format!("{min} to {max} arguments"),
    }
}

impl Expr {
    /// Evaluates the expression on one event.
    pub fn eval(&self, event: &Event) -> Result<Value, EvalError> {
        match self {
            Expr::Literal(value) => Ok(value.clone()),
            Expr::Field(path) => {
                event.payload.path(path).cloned().ok_or_else(|| EvalError::MissingField(join_path(path)))
            }
            Expr::KeyField(path) => {
                event.key.path(path).cloned().ok_or_else(|| EvalError::MissingKeyField(join_path(path)))
            }
            Expr::Meta(meta) => Ok(meta.value(event.event_type, &event.key, event.position, event.timestamp)),
            Expr::Call(function, args) => call(*function, args, event),
        }
    }

    /// The event fields this expression reads (for checks against schemas).
    pub fn fields(&self) -> Vec<&[Name]> {
        match self {
            Expr::Field(path) => vec![path.as_slice()],
            Expr::Call(_, args) => args.iter().flat_map(Expr::fields).collect(),
            _ => Vec::new(),
        }
    }
}

fn join_path(path: &[Name]) -> String {
    path.join(".")
}

fn call(function: Function, args: &[Expr], event: &Event) -> Result<Value, EvalError> {
    let name = Function::ALL.iter().find(|(_, f)| *f == function).map_or("?", |(n, _)| n);
    let bad = |found: &Value| EvalError::BadArgument { function: name, found: describe(found) };
    match function {
        Function::Coalesce => {
            for arg in args {
                let value = arg.eval(event)?;
                if !value.is_null() {
                    return Ok(value);
                }
            }
            Ok(Value::Null)
        }
        Function::Concat => {
            let mut out = String::new();
            for arg in args {
                match arg.eval(event)? {
                    Value::Null => {}
                    Value::Str(text) => out.push_str(&text),
                    other @ (Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Time(_)) => {
                        out.push_str(&other.to_string())
                    }
                    other => return Err(bad(&other)),
                }
            }
            Ok(Value::Str(out.into()))
        }
        _ => {
            let value = args[0].eval(event)?;
            if value.is_null() {
                return Ok(Value::Null);
            }
            match (function, value) {
                (Function::Lower, Value::Str(s)) => Ok(Value::Str(s.to_lowercase().into())),
                (Function::Upper, Value::Str(s)) => Ok(Value::Str(s.to_uppercase().into())),
                (Function::Trim, Value::Str(s)) => Ok(Value::Str(s.trim().into())),
                (
                    Function::ToString,
                    value @ (Value::Str(_) | Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Time(_)),
                ) => Ok(Value::Str(value.to_string().into())),
                (Function::ToInt, Value::Int(i)) => Ok(Value::Int(i)),
                // The integer written: days, or ms/µs/ns as its type says.
                (Function::ToInt, Value::Time(t)) => Ok(Value::Int(t.value)),
                (Function::ToInt, Value::Float(x)) if x.is_finite() => Ok(Value::Int(x.trunc() as i64)),
                (Function::ToInt, Value::Str(s)) => s.trim().parse().map(Value::Int).map_err(|_| bad(&Value::Str(s))),
                (Function::ToFloat, Value::Int(i)) => Ok(Value::Float(i as f64)),
                (Function::ToFloat, Value::Float(x)) => Ok(Value::Float(x)),
                (Function::ToFloat, Value::Str(s)) => {
                    s.trim().parse().map(Value::Float).map_err(|_| bad(&Value::Str(s)))
                }
                (_, other) => Err(bad(&other)),
            }
        }
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Str(s) => format!("the string {:?}", truncate(s)),
        other => format!("a {}", other.kind()),
    }
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(40) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Expr::Literal(Value::Str(s)) => write!(f, "'{}'", s.replace('\'', "''")),
            Expr::Literal(value) => write!(f, "{}", value.to_json()),
            Expr::Field(path) => f.write_str(&join_path(path)),
            Expr::KeyField(path) => write!(f, "$key.{}", join_path(path)),
            Expr::Meta(meta) => f.write_str(match meta {
                Meta::Key => "$key",
                Meta::Topic => "$topic",
                Meta::Partition => "$partition",
                Meta::Offset => "$offset",
                Meta::Timestamp => "$timestamp",
                Meta::EventType => "$event_type",
            }),
            Expr::Call(function, args) => {
                let name = Function::ALL.iter().find(|(_, g)| g == function).map_or("?", |(n, _)| n);
                let args: Vec<String> = args.iter().map(ToString::to_string).collect();
                write!(f, "{name}({})", args.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use crate::value::Record;

    fn event() -> Event {
        let address: Record = [(intern("city"), Value::from("Kraków"))].into_iter().collect();
        let payload: Record = [
            (intern("name"), Value::from("  Ada ")),
            (intern("email"), Value::from("ADA@EXAMPLE.COM")),
            (intern("quantity"), Value::Int(5)),
            (intern("nickname"), Value::Null),
            (intern("address"), Value::Record(address)),
        ]
        .into_iter()
        .collect();
        let key: Record = [(intern("id"), Value::from("u-1"))].into_iter().collect();
        Event {
            event_type: intern("com.example.users.UserRegistered"),
            version: 1,
            payload: Value::Record(payload),
            key: Value::Record(key),
            position: Position { topic: intern("users"), partition: 2, offset: 41 },
            timestamp: Some(1_700_000_000_000),
        }
    }

    fn eval(text: &str) -> Result<Value, EvalError> {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}")).eval(&event())
    }

    #[test]
    fn fields_metadata_and_literals() {
        assert_eq!(eval("quantity"), Ok(Value::Int(5)));
        assert_eq!(eval("address.city"), Ok(Value::from("Kraków")));
        assert_eq!(eval("$key.id"), Ok(Value::from("u-1")));
        assert_eq!(eval("$topic"), Ok(Value::from("users")));
        assert_eq!(eval("$partition"), Ok(Value::Int(2)));
        assert_eq!(eval("$offset"), Ok(Value::Int(41)));
        assert_eq!(eval("$timestamp"), Ok(Value::Int(1_700_000_000_000)));
        assert_eq!(eval("$event_type"), Ok(Value::from("com.example.users.UserRegistered")));
        assert_eq!(eval("'it''s'"), Ok(Value::from("it's")));
        assert_eq!(eval("-12"), Ok(Value::Int(-12)));
        assert_eq!(eval("2.5"), Ok(Value::Float(2.5)));
        assert_eq!(eval("true"), Ok(Value::Bool(true)));
        assert_eq!(eval("null"), Ok(Value::Null));
    }

    #[test]
    fn functions() {
        assert_eq!(eval("lower(email)"), Ok(Value::from("ada@example.com")));
        assert_eq!(eval("upper(trim(name))"), Ok(Value::from("ADA")));
        assert_eq!(
            eval("concat(trim(name), ' from ', address.city, ' #', quantity)"),
            Ok(Value::from("Ada from Kraków #5"))
        );
        assert_eq!(eval("coalesce(nickname, trim(name))"), Ok(Value::from("Ada")));
        assert_eq!(eval("to_string(quantity)"), Ok(Value::from("5")));
        assert_eq!(eval("to_int('42')"), Ok(Value::Int(42)));
        assert_eq!(eval("to_float(quantity)"), Ok(Value::Float(5.0)));
        assert_eq!(eval("lower(nickname)"), Ok(Value::Null));
    }

    #[test]
    fn evaluation_errors_are_values_not_panics() {
        assert_eq!(eval("missing"), Err(EvalError::MissingField("missing".into())));
        assert_eq!(eval("address.zip"), Err(EvalError::MissingField("address.zip".into())));
        assert_eq!(eval("$key.other"), Err(EvalError::MissingKeyField("other".into())));
        assert!(matches!(eval("lower(quantity)"), Err(EvalError::BadArgument { function: "lower", .. })));
        assert!(matches!(eval("to_int(email)"), Err(EvalError::BadArgument { function: "to_int", .. })));
    }

    #[test]
    fn parse_errors_point_at_the_problem() {
        let error = parse("lowercase(email)").unwrap_err();
        assert_eq!(error.column, 1);
        assert!(error.message.starts_with("unknown function `lowercase`"), "{error}");
        assert_eq!(parse("$keys").unwrap_err().column, 1);
        assert_eq!(parse("'open").unwrap_err().message, "unterminated string");
        assert_eq!(parse("a b").unwrap_err().column, 3);
        assert_eq!(parse("lower(a, b)").unwrap_err().message, "lower() takes one argument");
        assert_eq!(parse("a.").unwrap_err().message, "expected a field name after `.`");
        assert_eq!(parse("").unwrap_err().message, "expected an expression");
    }

    #[test]
    fn display_round_trips() {
        for text in ["concat(a.b, 'x''y', 3, $key.id)", "coalesce($timestamp, null)", "lower($event_type)"] {
            let expr = parse(text).unwrap();
            assert_eq!(parse(&expr.to_string()).unwrap(), expr, "{text}");
        }
    }
}
