//! Following paginated lists: every list RPC answers one page and says whether more follow.

use std::future::Future;

/// Every item of a paginated list: asks `page` for the page after a cursor (empty: the first
/// page) until an answer says no more follow; `cursor` gives the cursor an item stands for.
pub async fn all_pages<T, E, F, Fut>(
    mut page: F,
    cursor: impl Fn(&T) -> String,
) -> Result<Vec<T>, E>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, bool), E>>,
{
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let (items, more) = page(after.clone()).await?;
        let Some(last) = items.last() else {
            return Ok(all);
        };
        after = cursor(last);
        all.extend(items);
        if !more {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_are_followed_until_none_follow() {
        let names: Vec<String> = (0..7).map(|i| format!("n{i}")).collect();
        let mut asked = Vec::new();
        let all: Result<Vec<String>, ()> = all_pages(
            |after| {
                asked.push(after.clone());
                let rest: Vec<String> = names
                    .iter()
                    .filter(|n| after.is_empty() || **n > after)
                    .cloned()
                    .collect();
                let more = rest.len() > 3;
                async move { Ok((rest.into_iter().take(3).collect(), more)) }
            },
            String::clone,
        )
        .await;
        assert_eq!(all.unwrap(), names);
        assert_eq!(asked, vec!["", "n2", "n5"]);
    }
}
