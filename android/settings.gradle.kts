// The module as a build of its own, so an app includes it with its own versions (gradle/libs.versions.toml):
// the app's settings.gradle.kts says includeBuild("path/to/elemental/android"), its dependencies
// implementation("org.elemental:elemental"), and Gradle substitutes this project (docs/android.md).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "elemental"
