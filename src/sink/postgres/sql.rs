//! The names callers outside the sink import, at the path they import them
//! from: the statements, arrays, coercion and `COPY` text live in the
//! modules beside this one.

pub use super::arrays::{ColumnArray, TextColumn};
pub use super::coerce::{check_value, format_days, format_millis};
pub use super::copy::{copy_buffer, copy_rows};
pub use super::statements::{BindError, Insert, Statement};
pub use super::table::{quote, TableSql, VERSION_COLUMN};
