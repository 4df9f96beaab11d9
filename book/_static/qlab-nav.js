// Phone navigation for the QLab book. pydata-sphinx-theme 0.17 opens its sidebar dialogs from the first
// .primary-toggle / .secondary-toggle on the page only, which sphinx-book-theme 1.3 hides on small screens;
// the buttons students see (in the article header) did nothing. Forward their clicks to the wired button.
document.addEventListener("DOMContentLoaded", () => {
  for (const kind of ["primary-toggle", "secondary-toggle"]) {
    const buttons = Array.from(document.querySelectorAll("." + kind));
    const wired = buttons[0];
    for (const button of buttons.slice(1)) {
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        wired.click();
      });
    }
  }
});
