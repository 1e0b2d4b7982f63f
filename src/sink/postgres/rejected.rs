//! The ops a table refuses, found one at a time in savepoints of a
//! transaction that is then rolled back.

use sqlx::Executor;

use super::apply::bind;
use super::{database_message, PostgresSink};
use crate::projection::fold::{fold, GroupBy};
use crate::projection::WriteOp;
use crate::sink::SinkError;

impl PostgresSink {
    /// Finds the ops the table refuses, each alone in a savepoint of one
    /// transaction that is then rolled back: nothing is written. Returns
    /// the index of each refused op and why.
    pub async fn find_rejected(&self, ops: &[WriteOp]) -> Result<Vec<(usize, String)>, SinkError> {
        let mut rejected = Vec::new();
        let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
        for (index, op) in ops.iter().enumerate() {
            let folded = fold(std::slice::from_ref(op), &[], GroupBy::Key);
            let (net, errors) = (folded.net, folded.errors);
            if let Some(error) = errors.first() {
                rejected.push((index, error.to_string()));
                continue;
            }
            let statements = match self.table.plan(&net) {
                Ok(statements) => statements,
                Err(error) => {
                    rejected.push((index, error.to_string()));
                    continue;
                }
            };
            tx.execute("SAVEPOINT kawka_op").await.map_err(SinkError::Postgres)?;
            for statement in &statements {
                if let Err(error) = bind(&statement.sql, &statement.arrays).execute(&mut *tx).await {
                    match crate::error::classify_sqlx(&error) {
                        crate::error::ErrorClass::Permanent => {
                            rejected.push((index, database_message(&error)));
                            tx.execute("ROLLBACK TO SAVEPOINT kawka_op").await.map_err(SinkError::Postgres)?;
                            break;
                        }
                        _ => return Err(SinkError::Postgres(error)),
                    }
                }
            }
        }
        tx.rollback().await.map_err(SinkError::Postgres)?;
        Ok(rejected)
    }
}
